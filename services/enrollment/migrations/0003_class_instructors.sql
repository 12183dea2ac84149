-- Classes gain instructors: the users who teach them. An instructor's token
-- sees a class, its roster and its event key only when it is listed here.
ALTER TABLE classes ADD COLUMN instructor_ids uuid[] NOT NULL DEFAULT '{}';
