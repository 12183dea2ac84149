//! Tenant isolation and key visibility. Keys belong to the organization of
//! their class or of their pool's subscription profile (enrollment owns
//! both; key-issuance asks it). A caller who is not one of this project's
//! services sees only:
//!
//! - resources of the organizations its token names: another
//!   organization's class, pool, profile or key answers NOT_FOUND exactly
//!   as a missing one does;
//! - what its roles reach for the method (the policy table's scope): site
//!   administrators subscription and event keys, operations managers class
//!   enrollment keys, instructors the event keys of the classes they teach.
//!   Anything else is NOT_FOUND too.

use trainingkeys_proto::v1::KeyKind;
use trainingkeys_shared::auth::Caller;
use trainingkeys_shared::policy::Scope as Reach;
use uuid::Uuid;

use crate::domain::{ClassInfo, Scope};
use crate::error::Error;
use crate::service::KeyService;

/// A call's caller, and the method it called (for the policy's scopes).
pub struct Tenant {
    caller: Caller,
    reaches: Vec<Reach>,
}

impl Tenant {
    /// The caller of `request`, calling `method` (`"GetKey"`).
    pub fn of<T>(request: &tonic::Request<T>, method: &'static str) -> Self {
        let caller = Caller::of(request);
        let reaches = caller.reaches(&format!("/trainingkeys.v1.KeyIssuanceService/{method}"));
        Self { caller, reaches }
    }

    /// The caller's token subject, unless it is one of this project's services.
    pub fn outside_subject(&self) -> Option<&str> {
        if self.caller.is_internal() {
            None
        } else {
            self.caller.subject.as_deref()
        }
    }

    /// Whether the caller may see a key of `kind` of `class` (none for a
    /// pool's keys) here.
    pub fn sees(&self, kind: KeyKind, class: Option<&ClassInfo>) -> bool {
        let taught = || {
            let subject = self.caller.subject.as_deref();
            class.is_some_and(|c| subject.is_some_and(|s| c.instructor_ids.iter().any(|i| i == s)))
        };
        self.caller.is_internal()
            || self.reaches.iter().any(|reach| match reach {
                Reach::Org => true,
                Reach::OrgAdminKeys => matches!(kind, KeyKind::Subscription | KeyKind::Event),
                Reach::OrgClassKeys => kind == KeyKind::ClassEnrollment,
                Reach::Taught => taught(),
                Reach::TaughtEventKeys => kind == KeyKind::Event && taught(),
                Reach::OwnSubject => false,
            })
    }

    fn in_org(&self, org: &str, missing: Error) -> Result<(), Error> {
        if self.caller.in_org(org) {
            Ok(())
        } else {
            Err(missing)
        }
    }

    /// Checks the caller may reach the class or pool of `scope`, and keys
    /// of at least one of `kinds` in it; NOT_FOUND as if missing. Returns
    /// the class (for a class scope), to filter what a listing shows.
    pub async fn check_scope(
        &self,
        service: &KeyService,
        scope: Scope,
        kinds: &[KeyKind],
    ) -> Result<Option<ClassInfo>, Error> {
        let (class, missing) = match scope {
            Scope::Class(id) => (Some(service.class(id).await?), Error::ClassNotFound(id)),
            Scope::Pool(id) => (None, Error::PoolNotFound(id)),
        };
        if self.caller.is_internal() {
            return Ok(class);
        }
        let org = match (&class, scope) {
            (Some(c), _) => c.organization_id.clone(),
            (None, Scope::Pool(id)) => service.pool_organization(id).await?,
            (None, Scope::Class(id)) => return Err(Error::ClassNotFound(id)),
        };
        self.in_org(&org, missing)?;
        if kinds.iter().any(|kind| self.sees(*kind, class.as_ref())) {
            Ok(class)
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

    /// Checks the caller may see `key` (its organization, its kind, and
    /// for instructors its class); `missing` otherwise.
    pub async fn check_key(
        &self,
        service: &KeyService,
        key: &trainingkeys_proto::v1::Key,
        missing: Error,
    ) -> Result<(), Error> {
        if self.caller.is_internal() {
            return Ok(());
        }
        let (org, class) = match (
            Uuid::parse_str(&key.class_id),
            Uuid::parse_str(&key.pool_id),
        ) {
            (Ok(class_id), _) => {
                let class = service.class(class_id).await?;
                (class.organization_id.clone(), Some(class))
            }
            (_, Ok(pool_id)) => (service.pool_organization(pool_id).await?, None),
            _ => return Err(missing),
        };
        if !self.caller.in_org(&org) || !self.sees(key.kind(), class.as_ref()) {
            return Err(missing);
        }
        Ok(())
    }
}
