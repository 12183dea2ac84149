-- DEV ONLY. Run once by the postgres image on an empty data directory
-- (/docker-entrypoint-initdb.d), as the superuser, in database `trainingkeys`.
-- The passwords are published in this repository and match the dev Secrets in
-- kustomization.yaml: never use them anywhere else. Production does the same
-- with its own passwords (../../README.md, "Database roles").
--
-- One role per service, each owning its schema and nothing else: the
-- migrations (`<service> migrate`, as that role) find the schema already there
-- and need no CREATE on the database. CONNECTION LIMIT: the role's share of
-- max_connections (its pods plus its migration container; see the budget in
-- ../../base/kustomization.yaml).

REVOKE CONNECT ON DATABASE trainingkeys FROM PUBLIC;

CREATE ROLE enrollment LOGIN PASSWORD 'dev-only-enrollment' CONNECTION LIMIT 26;
CREATE ROLE key_issuance LOGIN PASSWORD 'dev-only-key-issuance' CONNECTION LIMIT 17;
CREATE ROLE redemption LOGIN PASSWORD 'dev-only-redemption' CONNECTION LIMIT 46;

GRANT CONNECT ON DATABASE trainingkeys TO enrollment, key_issuance, redemption;

CREATE SCHEMA enrollment AUTHORIZATION enrollment;
CREATE SCHEMA key_issuance AUTHORIZATION key_issuance;
CREATE SCHEMA redemption AUTHORIZATION redemption;
