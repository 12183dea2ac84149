//! Tenant isolation and key visibility. Keys belong to the organization of
//! their class or of their pool's subscription profile (enrollment owns
//! both; key-issuance asks it). A caller who is not one of this project's
//! services sees only:
//!
//! - resources of the organizations its token names: another
//!   organization's class, pool, profile or key answers NOT_FOUND exactly
//!   as a missing one does;
//! - the kinds of key its roles may see for the method (the policy table's
//!   scope): site administrators subscription and event keys, operations
//!   managers class enrollment keys, instructors event keys. A key of
//!   another kind is NOT_FOUND too.

use trainingkeys_proto::v1::KeyKind;
use trainingkeys_shared::auth::Caller;
use trainingkeys_shared::policy::{self, Scope as Reach};
use uuid::Uuid;

use crate::domain::Scope;
use crate::error::Error;
use crate::service::KeyService;

/// A call's caller, and the method it called (for the policy's scopes).
pub struct Tenant {
    caller: Caller,
    method: &'static str,
}

impl Tenant {
    /// The caller of `request`, calling `method` (`"GetKey"`).
    pub fn of<T>(request: &tonic::Request<T>, method: &'static str) -> Self {
        Self {
            caller: Caller::of(request),
            method,
        }
    }

    /// What the caller's roles may reach through this method.
    fn reaches(&self) -> impl Iterator<Item = Reach> + '_ {
        let path = format!("/trainingkeys.v1.KeyIssuanceService/{}", self.method);
        let rule = policy::rule(&path);
        self.caller
            .roles
            .iter()
            .filter_map(move |role| rule.and_then(|r| r.scope(*role)))
    }

    /// Whether the caller may see keys of `kind` here.
    pub fn sees_kind(&self, kind: KeyKind) -> bool {
        self.caller.is_internal()
            || self.reaches().any(|reach| match reach {
                Reach::Org => true,
                Reach::OrgAdminKeys => {
                    matches!(kind, KeyKind::Subscription | KeyKind::Event)
                }
                Reach::OrgClassKeys => kind == KeyKind::ClassEnrollment,
                Reach::OrgEventKeys => kind == KeyKind::Event,
                Reach::OwnSubject => false,
            })
    }

    /// `found` if the caller may act in `org`, else `missing`.
    pub fn in_org(&self, org: &str, missing: Error) -> Result<(), Error> {
        if self.caller.in_org(org) {
            Ok(())
        } else {
            Err(missing)
        }
    }

    /// Checks the caller may reach the class, pool or profile of `scope`,
    /// and keys of at least one of `kinds` in it; NOT_FOUND as if missing.
    pub async fn check_scope(
        &self,
        service: &KeyService,
        scope: Scope,
        kinds: &[KeyKind],
    ) -> Result<(), Error> {
        if self.caller.is_internal() {
            return Ok(());
        }
        let (org, missing) = match scope {
            Scope::Class(id) => (
                service.class_organization(id).await?,
                Error::ClassNotFound(id),
            ),
            Scope::Pool(id) => (
                service.pool_organization(id).await?,
                Error::PoolNotFound(id),
            ),
        };
        self.in_org(&org, missing)?;
        if kinds.iter().any(|kind| self.sees_kind(*kind)) {
            Ok(())
        } else {
            Err(match scope {
                Scope::Class(id) => Error::ClassNotFound(id),
                Scope::Pool(id) => Error::PoolNotFound(id),
            })
        }
    }

    /// Checks the caller may reach the profile `profile_id`.
    pub async fn check_profile(&self, service: &KeyService, profile_id: Uuid) -> Result<(), Error> {
        if self.caller.is_internal() {
            return Ok(());
        }
        let org = service.profile_organization(profile_id).await?;
        self.in_org(&org, Error::ProfileNotFound(profile_id))
    }

    /// Checks the caller may see `key` (its organization and its kind).
    pub async fn check_key(
        &self,
        service: &KeyService,
        key: &trainingkeys_proto::v1::Key,
        missing: Error,
    ) -> Result<(), Error> {
        if self.caller.is_internal() {
            return Ok(());
        }
        if !self.sees_kind(key.kind()) {
            return Err(missing);
        }
        let scope = match (
            Uuid::parse_str(&key.class_id),
            Uuid::parse_str(&key.pool_id),
        ) {
            (Ok(class_id), _) => Scope::Class(class_id),
            (_, Ok(pool_id)) => Scope::Pool(pool_id),
            _ => return Err(missing),
        };
        let org = match scope {
            Scope::Class(id) => service.class_organization(id).await?,
            Scope::Pool(id) => service.pool_organization(id).await?,
        };
        self.in_org(&org, missing)
    }
}
