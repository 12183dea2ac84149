//! Who may call what: the one policy table. The servers enforce it (the
//! method-level part in [`crate::auth`], the resource-level part, named in
//! each entry's scope, in the services), the README renders it
//! (`tk-dev policy`), and the tests iterate over it.

/// A role a bearer token may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Manages subscription profiles, key pools and subscription keys, and
    /// event keys, in their organizations.
    SiteAdministrator,
    /// Generates, views and exports class enrollment keys (the only role
    /// that sees them).
    OperationsManager,
    /// Sees the classes they teach (listed as an instructor), their rosters
    /// and their event keys.
    Instructor,
    /// A platform service that creates users, classes and profiles and
    /// enrolls or assigns directly, in the organizations its token names.
    ProvisioningService,
    /// A platform service that validates and redeems keys on behalf of a
    /// student named in the call.
    RedemptionFront,
    /// An end user, who validates and redeems for their own subject only.
    Student,
}

impl Role {
    /// Every role, in the order the README lists them.
    pub const ALL: [Role; 6] = [
        Role::SiteAdministrator,
        Role::OperationsManager,
        Role::Instructor,
        Role::ProvisioningService,
        Role::RedemptionFront,
        Role::Student,
    ];

    /// The name tokens carry in their `roles` claim.
    pub fn name(self) -> &'static str {
        match self {
            Role::SiteAdministrator => "site_administrator",
            Role::OperationsManager => "operations_manager",
            Role::Instructor => "instructor",
            Role::ProvisioningService => "provisioning_service",
            Role::RedemptionFront => "redemption_front",
            Role::Student => "student",
        }
    }

    /// The role a claim names, if this project knows it.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

/// One of this project's services, calling another (proved by its client
/// certificate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Internal {
    /// The redemption service.
    Redemption,
    /// The key-issuance service.
    KeyIssuance,
}

impl Internal {
    /// Its name, as the policy table shows it.
    pub fn name(self) -> &'static str {
        match self {
            Internal::Redemption => "redemption service",
            Internal::KeyIssuance => "key-issuance service",
        }
    }
}

/// What a role may reach through a method it is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Resources of the organizations its token names; another
    /// organization's answer NOT_FOUND, as a missing one does.
    Org,
    /// Like `Org`, and only subscription keys, pools and event keys.
    OrgAdminKeys,
    /// Like `Org`, and only class enrollment keys.
    OrgClassKeys,
    /// Only for the token's own subject, as an existing user.
    OwnSubject,
    /// Like `Org`, and only classes that list the token's subject as an
    /// instructor.
    Taught,
    /// Like `Taught`, and only their event keys.
    TaughtEventKeys,
}

impl Scope {
    /// How the README describes it.
    pub fn describe(self) -> &'static str {
        match self {
            Scope::Org => "own organizations",
            Scope::OrgAdminKeys => "own organizations; subscription and event keys",
            Scope::OrgClassKeys => "own organizations; class enrollment keys",
            Scope::OwnSubject => "own subject only",
            Scope::Taught => "own organizations; classes they teach",
            Scope::TaughtEventKeys => "own organizations; event keys of classes they teach",
        }
    }
}

/// The policy of one method.
#[derive(Debug)]
pub struct Rule {
    /// The gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    /// Roles allowed, each with what it may reach.
    pub roles: &'static [(Role, Scope)],
    /// Services of this project allowed (by client certificate), for any
    /// organization.
    pub services: &'static [Internal],
}

impl Rule {
    /// The method's short name.
    pub fn method(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap_or(self.path)
    }

    /// The service's short name (`EnrollmentService`).
    pub fn service(&self) -> &'static str {
        self.path
            .trim_start_matches('/')
            .split('/')
            .next()
            .and_then(|s| s.rsplit('.').next())
            .unwrap_or(self.path)
    }

    /// What `role` may reach here, if it is allowed at all.
    pub fn scope(&self, role: Role) -> Option<Scope> {
        self.roles.iter().find(|(r, _)| *r == role).map(|(_, s)| *s)
    }

    /// Callable only by this project's services.
    pub fn is_internal(&self) -> bool {
        self.roles.is_empty()
    }
}

use Internal::{KeyIssuance, Redemption};
use Role::{
    Instructor, OperationsManager, ProvisioningService, RedemptionFront, SiteAdministrator, Student,
};
use Scope::{Org, OrgAdminKeys, OrgClassKeys, OwnSubject, Taught, TaughtEventKeys};

macro_rules! rule {
    ($service:ident / $method:literal, [$($role:ident : $scope:ident),*], [$($internal:ident),*]) => {
        Rule {
            path: concat!("/trainingkeys.v1.", stringify!($service), "/", $method),
            roles: &[$(($role, $scope)),*],
            services: &[$($internal),*],
        }
    };
}

/// The policy: every method of the contract, and who may call it.
pub static POLICY: &[Rule] = &[
    rule!(EnrollmentService / "RegisterUser", [ProvisioningService: Org], [Redemption]),
    rule!(EnrollmentService / "GetUser", [ProvisioningService: Org], [Redemption]),
    rule!(EnrollmentService / "CreateClass", [ProvisioningService: Org], []),
    rule!(
        EnrollmentService / "GetClass",
        [ProvisioningService: Org, SiteAdministrator: Org, OperationsManager: Org, Instructor: Taught],
        [Redemption, KeyIssuance]
    ),
    rule!(EnrollmentService / "UpdateClass", [ProvisioningService: Org], []),
    rule!(
        EnrollmentService / "CreateSubscriptionProfile",
        [ProvisioningService: Org, SiteAdministrator: Org],
        []
    ),
    rule!(
        EnrollmentService / "GetSubscriptionProfile",
        [ProvisioningService: Org, SiteAdministrator: Org],
        [Redemption, KeyIssuance]
    ),
    rule!(EnrollmentService / "Enroll", [ProvisioningService: Org], [Redemption]),
    rule!(EnrollmentService / "CancelEnrollment", [ProvisioningService: Org], []),
    rule!(
        EnrollmentService / "ListEnrollments",
        [ProvisioningService: Org, OperationsManager: Org, Instructor: Taught],
        [Redemption]
    ),
    rule!(EnrollmentService / "AssignSubscription", [ProvisioningService: Org], [Redemption]),
    rule!(
        EnrollmentService / "ListSubscriptions",
        [ProvisioningService: Org, SiteAdministrator: Org],
        [Redemption]
    ),
    rule!(EnrollmentService / "VoidRedemption", [], [Redemption]),
    rule!(KeyIssuanceService / "GenerateSubscriptionKeys", [SiteAdministrator: Org], []),
    rule!(KeyIssuanceService / "GenerateClassEnrollmentKeys", [OperationsManager: Org], []),
    rule!(KeyIssuanceService / "SetEventKey", [SiteAdministrator: Org], []),
    rule!(KeyIssuanceService / "DisableEventKey", [SiteAdministrator: Org], []),
    rule!(
        KeyIssuanceService / "GetKey",
        [SiteAdministrator: OrgAdminKeys, OperationsManager: OrgClassKeys, Instructor: TaughtEventKeys],
        []
    ),
    rule!(
        KeyIssuanceService / "ListKeys",
        [SiteAdministrator: OrgAdminKeys, OperationsManager: OrgClassKeys, Instructor: TaughtEventKeys],
        []
    ),
    rule!(
        KeyIssuanceService / "ExportKeys",
        [SiteAdministrator: OrgAdminKeys, OperationsManager: OrgClassKeys],
        []
    ),
    rule!(
        KeyIssuanceService / "RevokeKey",
        [SiteAdministrator: OrgAdminKeys, OperationsManager: OrgClassKeys],
        []
    ),
    rule!(
        KeyIssuanceService / "RenderNotification",
        [SiteAdministrator: Org, Instructor: Taught],
        []
    ),
    rule!(KeyIssuanceService / "ResolveKey", [], [Redemption]),
    rule!(KeyIssuanceService / "ConsumeKey", [], [Redemption]),
    rule!(KeyIssuanceService / "ReleaseKey", [], [Redemption]),
    rule!(RedemptionService / "ValidateKey", [RedemptionFront: Org, Student: OwnSubject], []),
    rule!(RedemptionService / "RedeemKey", [RedemptionFront: Org, Student: OwnSubject], []),
];

/// The policy of the method at `path`, if the table has it.
pub fn rule(path: &str) -> Option<&'static Rule> {
    POLICY.iter().find(|rule| rule.path == path)
}

/// The table as Markdown, for the README.
pub fn markdown() -> String {
    let mut out =
        String::from("| method | roles (what they may reach) | services |\n|---|---|---|\n");
    for rule in POLICY {
        let roles = if rule.roles.is_empty() {
            "internal only".to_owned()
        } else {
            rule.roles
                .iter()
                .map(|(role, scope)| format!("{} ({})", role.name(), scope.describe()))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let services = rule
            .services
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| `{}.{}` | {} | {} |\n",
            rule.service(),
            rule.method(),
            roles,
            if services.is_empty() {
                "—"
            } else {
                &services
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_unique_and_allows_someone() {
        let mut paths: Vec<_> = POLICY.iter().map(|r| r.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), POLICY.len(), "a method appears twice");
        for rule in POLICY {
            assert!(
                !rule.roles.is_empty() || !rule.services.is_empty(),
                "{} allows nobody",
                rule.path
            );
        }
    }
}
