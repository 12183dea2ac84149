-- Enrollment's own schema (search_path = enrollment): users, classes,
-- subscription profiles, the roster and subscription assignments.

CREATE TABLE users (
    user_id         uuid PRIMARY KEY,
    organization_id text NOT NULL,
    -- Normalised: trimmed and lower-cased, so the unique key is case-insensitive.
    email           text NOT NULL,
    display_name    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_unique UNIQUE (organization_id, email)
);

CREATE TABLE classes (
    class_id        uuid PRIMARY KEY,
    organization_id text NOT NULL,
    title           text NOT NULL,
    course_id       text NOT NULL,
    start_time      timestamptz NOT NULL,
    end_time        timestamptz NOT NULL,
    max_students    integer NOT NULL CHECK (max_students >= 1),
    lab_access_days integer NOT NULL CHECK (lab_access_days >= 0),
    -- The seat count: moved only together with an enrollment row, in one
    -- transaction. The CHECK is the last line of defence against oversell.
    enrolled_count  integer NOT NULL DEFAULT 0
        CONSTRAINT classes_seats_within_max CHECK (enrolled_count >= 0 AND enrolled_count <= max_students),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT classes_end_after_start CHECK (end_time > start_time)
);

CREATE TABLE subscription_profiles (
    profile_id      uuid PRIMARY KEY,
    organization_id text NOT NULL,
    name            text NOT NULL,
    course_ids      text[] NOT NULL CHECK (cardinality(course_ids) >= 1),
    duration_days   integer NOT NULL CHECK (duration_days >= 1),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE enrollments (
    enrollment_id   uuid PRIMARY KEY,
    class_id        uuid NOT NULL REFERENCES classes (class_id),
    user_id         uuid NOT NULL REFERENCES users (user_id),
    source_key_id   uuid,
    enrolled_at     timestamptz NOT NULL DEFAULT now(),
    cancelled_at    timestamptz
);

-- A student holds at most one active seat per class.
CREATE UNIQUE INDEX enrollments_one_active_seat ON enrollments (class_id, user_id) WHERE cancelled_at IS NULL;
CREATE INDEX enrollments_roster ON enrollments (class_id, enrolled_at, enrollment_id);

CREATE TABLE subscriptions (
    subscription_id uuid PRIMARY KEY,
    profile_id      uuid NOT NULL REFERENCES subscription_profiles (profile_id),
    user_id         uuid NOT NULL REFERENCES users (user_id),
    source_key_id   uuid,
    starts_at       timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    course_ids      text[] NOT NULL,
    CHECK (expires_at > starts_at)
);

CREATE INDEX subscriptions_by_user ON subscriptions (user_id, starts_at DESC, subscription_id DESC);
