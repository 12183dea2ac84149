-- Key issuance's own schema (search_path = key_issuance): key pools, keys and
-- their uses. Classes and profiles live in enrollment and are referenced by id
-- only (no foreign keys across services).

CREATE TABLE key_pools (
    pool_id      uuid PRIMARY KEY,
    profile_id   uuid NOT NULL,
    name         text NOT NULL,
    valid_from   timestamptz,
    valid_until  timestamptz,
    uses_per_key integer NOT NULL CHECK (uses_per_key >= 1),
    key_count    bigint NOT NULL DEFAULT 0 CHECK (key_count >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_pools_window CHECK (valid_from IS NULL OR valid_until IS NULL OR valid_until > valid_from)
);

-- kind: 1 subscription, 2 class enrollment, 3 event (the KeyKind numbers).
-- The code is never stored plain: code_hmac (HMAC-SHA256 of the normalised
-- code) finds it, code_cipher (nonce ‖ AES-256-GCM ciphertext ‖ tag of the
-- display code, sealed with encryption key cipher_key_id) shows it.
-- No foreign key to key_pools: the pool row is written in the same
-- transaction, and a per-row RI trigger would double the cost of a
-- million-key COPY.
CREATE TABLE keys (
    key_id          uuid PRIMARY KEY,
    kind            smallint NOT NULL CHECK (kind IN (1, 2, 3)),
    pool_id         uuid,
    class_id        uuid,
    code_hmac       bytea NOT NULL,
    code_cipher     bytea NOT NULL,
    cipher_key_id   smallint NOT NULL,
    -- 0 = unlimited (event keys).
    max_uses        integer NOT NULL CHECK (max_uses >= 0),
    uses            integer NOT NULL DEFAULT 0,
    redeemable_after_class_end boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    -- The last line of defence against over-use.
    CONSTRAINT keys_uses_within_max CHECK (uses >= 0 AND (max_uses = 0 OR uses <= max_uses)),
    CONSTRAINT keys_target CHECK (
        (kind = 1 AND pool_id IS NOT NULL AND class_id IS NULL)
        OR (kind IN (2, 3) AND class_id IS NOT NULL AND pool_id IS NULL))
);

-- Codes are unique among unrevoked keys (a retired custom event code may be
-- set again). Lookups of revoked keys use the second, small partial index.
CREATE UNIQUE INDEX keys_code_unrevoked ON keys (code_hmac) WHERE revoked_at IS NULL;
CREATE INDEX keys_code_revoked ON keys (code_hmac) WHERE revoked_at IS NOT NULL;
-- Listing and export order: (created_at, key_id) within a pool or a class.
CREATE INDEX keys_by_pool ON keys (pool_id, created_at, key_id) WHERE pool_id IS NOT NULL;
CREATE INDEX keys_by_class ON keys (class_id, created_at, key_id) WHERE class_id IS NOT NULL;
-- At most one live event key per class.
CREATE UNIQUE INDEX keys_one_event_key ON keys (class_id) WHERE kind = 3 AND revoked_at IS NULL;

-- One row per use of a key: the primary key makes ConsumeKey idempotent per
-- redemption; ReleaseKey deletes the row and gives the use back.
CREATE TABLE key_uses (
    key_id        uuid NOT NULL REFERENCES keys (key_id),
    redemption_id uuid NOT NULL,
    user_id       uuid NOT NULL,
    used_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (key_id, redemption_id)
);
CREATE INDEX key_uses_by_user ON key_uses (key_id, user_id);
