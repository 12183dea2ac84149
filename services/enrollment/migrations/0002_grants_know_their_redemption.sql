-- Grants know their redemption (exactly-once redemption).
--
-- A redemption that is driven more than once (a client's retry, recovery, a
-- statement that commits after its caller gave up) must tell "the grant I
-- made earlier" from "a grant the student already had". So a seat or
-- subscription taken on behalf of a redemption names it.

ALTER TABLE enrollments ADD COLUMN redemption_id uuid;
ALTER TABLE subscriptions ADD COLUMN redemption_id uuid;

-- Every redemption enrollment has answered, granted or refused. Its primary
-- key is what makes Enroll idempotent per redemption: the statement that
-- takes a seat also inserts the redemption here, and a refusal is recorded
-- here too, so a late duplicate of the same redemption (still queued on the
-- class row when its twin was refused) fails on the key instead of taking a
-- seat after the redemption was answered "full". Unique checks see committed
-- rows whatever a statement's snapshot, which a NOT EXISTS would not.
CREATE TABLE redemptions (
    redemption_id  uuid PRIMARY KEY,
    -- Set when the redemption was refused: CLASS_FULL (for want of a seat)
    -- or VOIDED (it failed, and VoidRedemption took its grant back). Every
    -- repeat is answered the same. (The other refusals, an unknown class or
    -- user or another organization, cannot change, so they need no record.)
    refused_reason text,
    -- Set when the student already held the grant (this enrollment or
    -- subscription id) when the redemption asked: every repeat is answered
    -- with it, even once it is cancelled, so a late twin of the redemption
    -- never takes a grant of its own.
    held_before    uuid,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX enrollments_by_redemption ON enrollments (redemption_id) WHERE redemption_id IS NOT NULL;
CREATE UNIQUE INDEX subscriptions_by_redemption ON subscriptions (redemption_id) WHERE redemption_id IS NOT NULL;

-- The redemption that registered the user (self-registration), if any: only
-- such an account, and only by VoidRedemption of that same redemption, is
-- ever removed (a student turned away keeps no account).
ALTER TABLE users ADD COLUMN created_by_redemption uuid;
