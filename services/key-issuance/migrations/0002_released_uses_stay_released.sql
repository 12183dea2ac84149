-- A released use stays released, and a driver that lost its lease cannot write.
--
-- ReleaseKey used to delete the use, so a ConsumeKey of the same redemption
-- arriving later (a slow twin of a redemption that was compensated) took the
-- key again. The row now stays, marked released, and refuses that consume;
-- releasing a redemption that has no use yet leaves such a marker too (with
-- no user). `generation` is the fencing token of the redemption's driver:
-- the highest seen, and calls carrying a lower one are refused.

ALTER TABLE key_uses ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE key_uses ADD COLUMN released_at timestamptz;
ALTER TABLE key_uses ALTER COLUMN user_id DROP NOT NULL;
ALTER TABLE key_uses ADD CONSTRAINT key_uses_live_have_a_user CHECK (released_at IS NOT NULL OR user_id IS NOT NULL);
