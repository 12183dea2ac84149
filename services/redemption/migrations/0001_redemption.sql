-- Redemption's own schema (search_path = redemption): the redemption log,
-- which doubles as the idempotency record.

CREATE TABLE redemptions (
    redemption_id   uuid PRIMARY KEY,
    -- Client-chosen; one redemption per idempotency key, ever.
    idempotency_key text NOT NULL CONSTRAINT redemptions_idempotency_key_unique UNIQUE,
    -- The encoded RedeemKeyRequest, to tell a retry from a reuse of the key.
    request         bytea NOT NULL,
    -- admitted: key resolved, user known, seat held / key about to be consumed;
    -- completed: response stored; failed: final error stored.
    state           text NOT NULL CHECK (state IN ('admitted', 'completed', 'failed')),
    key_id          uuid NOT NULL,
    -- 1 subscription, 2 class enrollment, 3 event (trainingkeys.v1.KeyKind).
    key_kind        integer NOT NULL,
    -- The class (class keys) or subscription profile (subscription keys).
    target_id       uuid NOT NULL,
    user_id         uuid NOT NULL,
    -- Whether a seat hold was placed in the Redis gate (to release it).
    seat_held       boolean NOT NULL DEFAULT false,
    -- The user row was created by this redemption (reported in the response).
    user_created    boolean NOT NULL DEFAULT false,
    -- Encoded RedeemKeyResponse once completed: replays are byte-identical.
    response        bytea,
    -- gRPC code, ErrorInfo reason and message once failed.
    error_code      integer,
    error_reason    text,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The recovery loop scans unfinished redemptions, oldest first.
CREATE INDEX redemptions_unfinished ON redemptions (updated_at) WHERE state = 'admitted';
