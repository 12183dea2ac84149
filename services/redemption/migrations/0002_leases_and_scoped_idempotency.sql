-- One driver per redemption, and idempotency keys scoped to who redeems.
--
-- generation: the fencing token of the redemption's driver. The driver
-- renews its lease by touching updated_at (PostgreSQL's clock, never a
-- replica's); a take-over, allowed only after RECOVERY_AFTER_SECONDS of
-- silence, bumps the generation, and every write of an older driver (the
-- record's completion or failure here, ConsumeKey and ReleaseKey in
-- key-issuance) names its generation and is refused.
ALTER TABLE redemptions ADD COLUMN generation bigint NOT NULL DEFAULT 1;

-- scope: who redeems ("user:<id>" or "new:<organization>/<email>"). An
-- idempotency key is unique within its scope only, so a predictable key
-- claimed in advance by someone else answers nothing for this student.
ALTER TABLE redemptions ADD COLUMN scope text NOT NULL DEFAULT '';
UPDATE redemptions SET scope = 'user:' || user_id::text;
ALTER TABLE redemptions DROP CONSTRAINT redemptions_idempotency_key_unique;
ALTER TABLE redemptions ADD CONSTRAINT redemptions_idempotency_key_unique UNIQUE (scope, idempotency_key);

-- Never written or read: seat holds are released by the record's kind.
ALTER TABLE redemptions DROP COLUMN seat_held;

-- failing: the redemption's final error is decided and recorded, and its
-- compensation (give the key's use back, void its grant, release the hold)
-- is under way; a driver that stops half-way leaves it failing, and whoever
-- takes it over finishes the compensation, never the redemption.
ALTER TABLE redemptions DROP CONSTRAINT redemptions_state_check;
ALTER TABLE redemptions ADD CONSTRAINT redemptions_state_check
    CHECK (state IN ('admitted', 'failing', 'completed', 'failed'));
DROP INDEX redemptions_unfinished;
CREATE INDEX redemptions_unfinished ON redemptions (updated_at) WHERE state IN ('admitted', 'failing');

-- audited_at: when recovery last made sure a failed redemption holds no key
-- use and no grant. Set as a redemption fails; the ones failed before this
-- migration (by code that could leave a use behind) are audited once.
ALTER TABLE redemptions ADD COLUMN audited_at timestamptz;
CREATE INDEX redemptions_unaudited ON redemptions (created_at) WHERE state = 'failed' AND audited_at IS NULL;

-- legacy: recorded before grants named their redemption. Such a redemption
-- still in flight may find its own seat or subscription without its id on
-- it (made with its key, after it was recorded): that grant keeps its use.
ALTER TABLE redemptions ADD COLUMN legacy boolean NOT NULL DEFAULT false;
UPDATE redemptions SET legacy = true;
