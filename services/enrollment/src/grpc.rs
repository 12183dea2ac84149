//! The gRPC transport: each handler turns its request into a validated
//! command, calls the store, and turns the result into a response.

use tonic::{Request, Response, Status};
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_server::EnrollmentService;
use trainingkeys_shared::auth::Caller;
use trainingkeys_shared::policy::Scope as Reach;
use trainingkeys_shared::{page, validate};

use crate::domain::{ClassChange, NewClass, NewProfile, NewUser};
use crate::error::Error;
use crate::store::Store;

/// `EnrollmentService` over a [`Store`].
pub struct EnrollmentGrpc {
    store: Store,
}

impl EnrollmentGrpc {
    /// The service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// Tenant isolation: a resource of an organization the caller may not act
/// in answers exactly as a missing one (`missing`), so ids reveal nothing.
/// Internal services act for every organization.
fn visible<T>(caller: &Caller, org: &str, found: T, missing: Error) -> Result<T, Error> {
    if caller.in_org(org) {
        Ok(found)
    } else {
        Err(missing)
    }
}

/// Fields only the redemption service sets: anyone else naming a
/// redemption (whose id is derived from who redeems and an idempotency
/// key) could read or pre-empt another's redemption.
fn internal_only(caller: &Caller, fields: &[(&'static str, bool)]) -> Result<(), Error> {
    match fields.iter().find(|(_, set)| *set) {
        Some((field, _)) if !caller.is_internal() => Err(Error::InternalField(field)),
        _ => Ok(()),
    }
}

/// A write into `org` by a caller who may not act there is refused.
fn may_write(caller: &Caller, org: &str) -> Result<(), Error> {
    if caller.in_org(org) {
        Ok(())
    } else {
        Err(Error::OrganizationNotAllowed)
    }
}

impl EnrollmentGrpc {
    /// The class, if the caller may reach it through `method`: in its
    /// organizations, and, for a role that reaches only the classes it
    /// teaches (instructors), listed as one of its instructors.
    async fn class_for(
        &self,
        caller: &Caller,
        method: &str,
        class_id: uuid::Uuid,
    ) -> Result<crate::domain::Class, Error> {
        let class = self.store.get_class(class_id).await?;
        let org = class.organization_id.clone();
        let class = visible(caller, &org, class, Error::ClassNotFound(class_id))?;
        let path = format!("/trainingkeys.v1.EnrollmentService/{method}");
        let reaches = caller.is_internal()
            || caller.reaches(&path).into_iter().any(|scope| match scope {
                Reach::Taught | Reach::TaughtEventKeys => {
                    class.taught_by(caller.subject.as_deref())
                }
                _ => true,
            });
        if reaches {
            Ok(class)
        } else {
            Err(Error::ClassNotFound(class_id))
        }
    }

    /// The user, if the caller may see it.
    async fn user_for(
        &self,
        caller: &Caller,
        user_id: uuid::Uuid,
    ) -> Result<crate::domain::User, Error> {
        let user = self.store.get_user(user_id).await?;
        let org = user.organization_id.clone();
        visible(caller, &org, user, Error::UserNotFound(user_id))
    }

    /// The profile, if the caller may see it.
    async fn profile_for(
        &self,
        caller: &Caller,
        profile_id: uuid::Uuid,
    ) -> Result<crate::domain::Profile, Error> {
        let profile = self.store.get_profile(profile_id).await?;
        let org = profile.organization_id.clone();
        visible(caller, &org, profile, Error::ProfileNotFound(profile_id))
    }
}

fn reply<T>(message: T) -> Reply<T> {
    Ok(Response::new(message))
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentGrpc {
    async fn register_user(
        &self,
        request: Request<pb::RegisterUserRequest>,
    ) -> Reply<pb::RegisterUserResponse> {
        let caller = Caller::of(&request);
        let new = NewUser::try_from(request.into_inner()).map_err(Error::from)?;
        internal_only(
            &caller,
            &[
                ("user_id", new.user_id.is_some()),
                ("redemption_id", new.redemption_id.is_some()),
            ],
        )?;
        may_write(&caller, &new.organization_id)?;
        let (user, created) = self.store.register_user(new).await?;
        reply(pb::RegisterUserResponse {
            user: Some(user.into()),
            created,
        })
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Reply<pb::GetUserResponse> {
        let caller = Caller::of(&request);
        let r = request.get_ref();
        let user = if r.user_id.is_empty() && !r.email.is_empty() {
            let org = validate::organization_id("organization_id", &r.organization_id)
                .map_err(Error::from)?;
            let email = validate::email("email", &r.email).map_err(Error::from)?;
            visible(&caller, &org, (), Error::UserNotFoundByEmail)?;
            self.store
                .find_user(&org, &email)
                .await?
                .ok_or(Error::UserNotFoundByEmail)?
        } else {
            let user_id = validate::id("user_id", &r.user_id).map_err(Error::from)?;
            self.user_for(&caller, user_id).await?
        };
        reply(pb::GetUserResponse {
            user: Some(user.into()),
        })
    }

    async fn create_class(
        &self,
        request: Request<pb::CreateClassRequest>,
    ) -> Reply<pb::CreateClassResponse> {
        let caller = Caller::of(&request);
        let new = NewClass::try_from(request.into_inner()).map_err(Error::from)?;
        may_write(&caller, &new.organization_id)?;
        let class = self.store.create_class(new).await?;
        reply(pb::CreateClassResponse {
            class: Some(class.into()),
        })
    }

    async fn get_class(
        &self,
        request: Request<pb::GetClassRequest>,
    ) -> Reply<pb::GetClassResponse> {
        let class_id =
            validate::id("class_id", &request.get_ref().class_id).map_err(Error::from)?;
        let class = self
            .class_for(&Caller::of(&request), "GetClass", class_id)
            .await?;
        reply(pb::GetClassResponse {
            class: Some(class.into()),
        })
    }

    async fn update_class(
        &self,
        request: Request<pb::UpdateClassRequest>,
    ) -> Reply<pb::UpdateClassResponse> {
        let caller = Caller::of(&request);
        let change = ClassChange::try_from(request.into_inner()).map_err(Error::from)?;
        self.class_for(&caller, "UpdateClass", change.class_id)
            .await?;
        let class = self.store.update_class(change).await?;
        reply(pb::UpdateClassResponse {
            class: Some(class.into()),
        })
    }

    async fn create_subscription_profile(
        &self,
        request: Request<pb::CreateSubscriptionProfileRequest>,
    ) -> Reply<pb::CreateSubscriptionProfileResponse> {
        let caller = Caller::of(&request);
        let new = NewProfile::try_from(request.into_inner()).map_err(Error::from)?;
        may_write(&caller, &new.organization_id)?;
        let profile = self.store.create_profile(new).await?;
        reply(pb::CreateSubscriptionProfileResponse {
            profile: Some(profile.into()),
        })
    }

    async fn get_subscription_profile(
        &self,
        request: Request<pb::GetSubscriptionProfileRequest>,
    ) -> Reply<pb::GetSubscriptionProfileResponse> {
        let profile_id =
            validate::id("profile_id", &request.get_ref().profile_id).map_err(Error::from)?;
        let profile = self.profile_for(&Caller::of(&request), profile_id).await?;
        reply(pb::GetSubscriptionProfileResponse {
            profile: Some(profile.into()),
        })
    }

    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Reply<pb::EnrollResponse> {
        let r = request.get_ref();
        let class_id = validate::id("class_id", &r.class_id).map_err(Error::from)?;
        let user_id = validate::id("user_id", &r.user_id).map_err(Error::from)?;
        let source_key_id =
            validate::optional_id("source_key_id", &r.source_key_id).map_err(Error::from)?;
        let redemption_id =
            validate::optional_id("redemption_id", &r.redemption_id).map_err(Error::from)?;
        let caller = Caller::of(&request);
        internal_only(
            &caller,
            &[
                ("source_key_id", source_key_id.is_some()),
                ("redemption_id", redemption_id.is_some()),
            ],
        )?;
        if !caller.is_internal() {
            self.class_for(&caller, "Enroll", class_id).await?;
            self.user_for(&caller, user_id).await?;
        }
        let (enrollment, already_enrolled) = self
            .store
            .enroll(class_id, user_id, source_key_id, redemption_id)
            .await?;
        reply(pb::EnrollResponse {
            enrollment: Some(enrollment.into()),
            already_enrolled,
        })
    }

    async fn cancel_enrollment(
        &self,
        request: Request<pb::CancelEnrollmentRequest>,
    ) -> Reply<pb::CancelEnrollmentResponse> {
        let id =
            validate::id("enrollment_id", &request.get_ref().enrollment_id).map_err(Error::from)?;
        let caller = Caller::of(&request);
        if !caller.is_internal() {
            let org = self.store.enrollment_organization(id).await?;
            visible(&caller, &org, (), Error::EnrollmentNotFound(id))?;
        }
        let (enrollment, already_cancelled) = self.store.cancel_enrollment(id).await?;
        reply(pb::CancelEnrollmentResponse {
            enrollment: Some(enrollment.into()),
            already_cancelled,
        })
    }

    async fn list_enrollments(
        &self,
        request: Request<pb::ListEnrollmentsRequest>,
    ) -> Reply<pb::ListEnrollmentsResponse> {
        let r = request.get_ref();
        let class_id = validate::id("class_id", &r.class_id).map_err(Error::from)?;
        let user_id = validate::optional_id("user_id", &r.user_id).map_err(Error::from)?;
        let limit = page::page_size(r.page_size).map_err(Error::from)?;
        let after = page::decode(&r.page_token).map_err(Error::from)?;
        let caller = Caller::of(&request);
        if !caller.is_internal() {
            self.class_for(&caller, "ListEnrollments", class_id).await?;
        }
        let rows = self
            .store
            .list_enrollments(class_id, user_id, r.include_cancelled, after, limit)
            .await?;
        let next_page_token = page::next_token(&rows, limit, |e| page::Cursor {
            time: e.enrolled_at,
            id: e.enrollment_id,
        });
        reply(pb::ListEnrollmentsResponse {
            enrollments: rows.into_iter().map(Into::into).collect(),
            next_page_token,
        })
    }

    async fn assign_subscription(
        &self,
        request: Request<pb::AssignSubscriptionRequest>,
    ) -> Reply<pb::AssignSubscriptionResponse> {
        let r = request.get_ref();
        let profile_id = validate::id("profile_id", &r.profile_id).map_err(Error::from)?;
        let user_id = validate::id("user_id", &r.user_id).map_err(Error::from)?;
        let source_key_id =
            validate::optional_id("source_key_id", &r.source_key_id).map_err(Error::from)?;
        let redemption_id =
            validate::optional_id("redemption_id", &r.redemption_id).map_err(Error::from)?;
        let caller = Caller::of(&request);
        internal_only(
            &caller,
            &[
                ("source_key_id", source_key_id.is_some()),
                ("redemption_id", redemption_id.is_some()),
            ],
        )?;
        if !caller.is_internal() {
            self.profile_for(&caller, profile_id).await?;
            self.user_for(&caller, user_id).await?;
        }
        let (subscription, already_assigned) = self
            .store
            .assign_subscription(profile_id, user_id, source_key_id, redemption_id)
            .await?;
        reply(pb::AssignSubscriptionResponse {
            subscription: Some(subscription.into()),
            already_assigned,
        })
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Reply<pb::ListSubscriptionsResponse> {
        let r = request.get_ref();
        let user_id = validate::id("user_id", &r.user_id).map_err(Error::from)?;
        let limit = page::page_size(r.page_size).map_err(Error::from)?;
        let before = page::decode(&r.page_token).map_err(Error::from)?;
        let caller = Caller::of(&request);
        if !caller.is_internal() {
            self.user_for(&caller, user_id).await?;
        }
        let rows = self
            .store
            .list_subscriptions(user_id, before, limit)
            .await?;
        let next_page_token = page::next_token(&rows, limit, |s| page::Cursor {
            time: s.starts_at,
            id: s.subscription_id,
        });
        reply(pb::ListSubscriptionsResponse {
            subscriptions: rows.into_iter().map(Into::into).collect(),
            next_page_token,
        })
    }

    async fn void_redemption(
        &self,
        request: Request<pb::VoidRedemptionRequest>,
    ) -> Reply<pb::VoidRedemptionResponse> {
        let r = request.get_ref();
        let rid = validate::id("redemption_id", &r.redemption_id).map_err(Error::from)?;
        let created_user =
            validate::optional_id("created_user_id", &r.created_user_id).map_err(Error::from)?;
        reply(pb::VoidRedemptionResponse {
            taken_back: self.store.void_redemption(rid, created_user).await?,
        })
    }
}
