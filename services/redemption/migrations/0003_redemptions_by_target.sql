-- The redemptions recorded for a class: read when the admission gate
-- rebuilds a class's state, so that the retry of any of them is answered
-- from its record rather than turned away by the gate alone. (Built in the
-- migration's transaction: redemptions wait for it, a few seconds per
-- million rows.)
CREATE INDEX IF NOT EXISTS redemptions_by_target ON redemptions (target_id);
