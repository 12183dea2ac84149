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
