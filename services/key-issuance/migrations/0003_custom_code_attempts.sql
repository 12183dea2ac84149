-- Custom event codes are unique across every organization, so a taken code
-- tells its caller that some organization's event uses it. Attempts are
-- kept per caller (the token's subject) for an hour: past a limit of codes
-- found taken, that caller may not choose custom codes for a while, so
-- SetEventKey is no oracle for guessing live codes.
CREATE TABLE custom_code_attempts (
    attempt_id uuid PRIMARY KEY,
    subject text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX custom_code_attempts_by_subject ON custom_code_attempts (subject, at);
