//! Calls to key-issuance and enrollment. Each carries the trace context, each
//! failure status is turned into a local [`Error`] by its reason (never passed
//! through blindly), and an outage (a refused stream when a connection ages
//! out, a timeout) is retried by `trainingkeys_shared::peer::call`: every
//! call redemption makes is idempotent.

use std::time::Duration;

use tonic::Code;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_shared::{InvalidField, peer};
use uuid::Uuid;

use crate::error::Error;

/// Each call observed (a client span, its trace context sent along, its
/// duration), and balanced over the peer's replicas.
type Traced = trainingkeys_shared::rpc::Client;

/// Clients of the two services redemption orchestrates.
#[derive(Clone)]
pub struct Clients {
    enrollment: EnrollmentServiceClient<Traced>,
    keys: KeyIssuanceServiceClient<Traced>,
}

/// Turns a peer's status into a local error: an outage (by the error types
/// behind it), or an answer by its ErrorInfo reason.
fn from_status(service: &'static str, status: tonic::Status) -> Error {
    if peer::classify(&status) != peer::Failure::Answer {
        return Error::Unavailable(service);
    }
    let reason = trainingkeys_shared::error::reason(&status).unwrap_or_default();
    match (status.code(), reason.as_str()) {
        (_, "KEY_MISTYPED") => Error::KeyMistyped,
        (_, "KEY_NOT_FOUND") => Error::KeyNotFound,
        (_, "KEY_REVOKED") => Error::KeyRevoked,
        (_, "KEY_ALREADY_REDEEMED") => Error::KeyAlreadyRedeemed,
        (_, "KEY_USE_RELEASED") => Error::KeyUseReleased,
        // Seen only by a driver that lost its lease (a later one decided).
        (_, "STALE_GENERATION" | "REDEMPTION_VOIDED") => Error::LeaseLost,
        (_, "CLASS_FULL") => Error::ClassFull,
        (_, "USER_NOT_FOUND") => Error::UserNotFound,
        (_, "ORGANIZATION_MISMATCH") => Error::OrganizationMismatch,
        (Code::InvalidArgument, "INVALID_FIELD") => {
            use tonic_types::StatusExt;
            let field = status
                .get_details_error_info()
                .and_then(|i| i.metadata.get("field").cloned());
            // Only fields redemption passes through from its own request.
            let ours = match field.as_deref() {
                Some("email") => "new_user.email",
                Some("organization_id") => "new_user.organization_id",
                Some("display_name") => "new_user.display_name",
                Some("code") => "code",
                _ => {
                    return Error::Upstream {
                        service,
                        message: status.message().to_owned(),
                    };
                }
            };
            Error::InvalidField(InvalidField::new(ours, status.message().to_owned()))
        }
        _ => Error::Upstream {
            service,
            message: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

const KEYS: &str = "key-issuance";
const ENROLLMENT: &str = "enrollment";

/// Runs an idempotent call on a clone of `client`, retrying outages
/// (`peer::call`), and turns a failure into a local error.
async fn call<C, R, T, F, Fut>(
    service: &'static str,
    client: &C,
    request: R,
    send: F,
) -> Result<T, Error>
where
    C: Clone,
    R: Clone,
    F: Fn(C, R) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    peer::call(|| send(client.clone(), request.clone()))
        .await
        .map_err(|status| from_status(service, status))
}

impl Clients {
    /// Lazily connected clients; each call gives up after `timeout`
    /// (`PEER_TIMEOUT_MS`).
    pub fn new(
        enrollment_url: &str,
        key_issuance_url: &str,
        timeout: Duration,
        tls: Option<&trainingkeys_shared::tls::Tls>,
    ) -> anyhow::Result<Self> {
        let enrollment = trainingkeys_shared::server::peer(enrollment_url, timeout, tls)?;
        let keys = trainingkeys_shared::server::peer(key_issuance_url, timeout, tls)?;
        Ok(Self {
            enrollment: EnrollmentServiceClient::new(enrollment),
            keys: KeyIssuanceServiceClient::new(keys),
        })
    }

    /// ResolveKey.
    pub async fn resolve_key(
        &self,
        code: &str,
        user_id: Option<Uuid>,
    ) -> Result<pb::ResolveKeyResponse, Error> {
        let request = pb::ResolveKeyRequest {
            code: code.to_owned(),
            user_id: opt(user_id),
        };
        call(KEYS, &self.keys, request, |mut c, r| async move {
            c.resolve_key(r).await
        })
        .await
    }

    /// ConsumeKey, fenced by the driver's generation.
    pub async fn consume_key(
        &self,
        key_id: Uuid,
        user_id: Uuid,
        redemption_id: Uuid,
        generation: i64,
    ) -> Result<(), Error> {
        let request = pb::ConsumeKeyRequest {
            key_id: key_id.to_string(),
            user_id: user_id.to_string(),
            redemption_id: redemption_id.to_string(),
            generation,
        };
        call(KEYS, &self.keys, request, |mut c, r| async move {
            c.consume_key(r).await
        })
        .await
        .map(drop)
    }

    /// ReleaseKey (idempotent; fenced by the driver's generation).
    pub async fn release_key(
        &self,
        key_id: Uuid,
        redemption_id: Uuid,
        generation: i64,
    ) -> Result<(), Error> {
        let request = pb::ReleaseKeyRequest {
            key_id: key_id.to_string(),
            redemption_id: redemption_id.to_string(),
            generation,
        };
        call(KEYS, &self.keys, request, |mut c, r| async move {
            c.release_key(r).await
        })
        .await
        .map(drop)
    }

    /// GetUser.
    pub async fn get_user(&self, user_id: Uuid) -> Result<pb::User, Error> {
        self.get_user_by(pb::GetUserRequest {
            user_id: user_id.to_string(),
            ..Default::default()
        })
        .await
    }

    /// The user with this email in this organization, if any (no write).
    pub async fn find_user(&self, new: &pb::NewUser) -> Result<Option<pb::User>, Error> {
        let request = pb::GetUserRequest {
            organization_id: new.organization_id.clone(),
            email: new.email.clone(),
            ..Default::default()
        };
        match self.get_user_by(request).await {
            Ok(user) => Ok(Some(user)),
            Err(Error::UserNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_user_by(&self, request: pb::GetUserRequest) -> Result<pb::User, Error> {
        let r = call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.get_user(r).await },
        )
        .await?;
        r.user.ok_or_else(|| missing("GetUser.user"))
    }

    /// RegisterUser for a redemption, under the id `user_id` if created:
    /// the user and whether it was created.
    pub async fn register_user(
        &self,
        new: &pb::NewUser,
        user_id: Uuid,
        redemption_id: Uuid,
    ) -> Result<(pb::User, bool), Error> {
        let request = pb::RegisterUserRequest {
            organization_id: new.organization_id.clone(),
            email: new.email.clone(),
            display_name: new.display_name.clone(),
            user_id: user_id.to_string(),
            redemption_id: redemption_id.to_string(),
        };
        let r = call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.register_user(r).await },
        )
        .await?;
        Ok((
            r.user.ok_or_else(|| missing("RegisterUser.user"))?,
            r.created,
        ))
    }

    /// GetClass (current dates, maximum and seats).
    pub async fn get_class(&self, class_id: &str) -> Result<pb::Class, Error> {
        let request = pb::GetClassRequest {
            class_id: class_id.to_owned(),
        };
        let r = call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.get_class(r).await },
        )
        .await?;
        r.class.ok_or_else(|| missing("GetClass.class"))
    }

    /// GetSubscriptionProfile.
    pub async fn get_profile(&self, profile_id: &str) -> Result<pb::SubscriptionProfile, Error> {
        let request = pb::GetSubscriptionProfileRequest {
            profile_id: profile_id.to_owned(),
        };
        let r = call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.get_subscription_profile(r).await },
        )
        .await?;
        r.profile
            .ok_or_else(|| missing("GetSubscriptionProfile.profile"))
    }

    /// Enroll on behalf of a redemption: the enrollment and whether it
    /// existed before this call (this redemption's own, or another).
    pub async fn enroll(
        &self,
        class_id: Uuid,
        user_id: Uuid,
        key_id: Uuid,
        redemption_id: Uuid,
    ) -> Result<(pb::Enrollment, bool), Error> {
        let request = pb::EnrollRequest {
            class_id: class_id.to_string(),
            user_id: user_id.to_string(),
            source_key_id: key_id.to_string(),
            redemption_id: redemption_id.to_string(),
        };
        let r = call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.enroll(r).await },
        )
        .await?;
        Ok((
            r.enrollment.ok_or_else(|| missing("Enroll.enrollment"))?,
            r.already_enrolled,
        ))
    }

    /// AssignSubscription on behalf of a redemption: the subscription and
    /// whether it existed before this call (this redemption's own, or another).
    pub async fn assign_subscription(
        &self,
        profile_id: Uuid,
        user_id: Uuid,
        key_id: Uuid,
        redemption_id: Uuid,
    ) -> Result<(pb::Subscription, bool), Error> {
        let request = pb::AssignSubscriptionRequest {
            profile_id: profile_id.to_string(),
            user_id: user_id.to_string(),
            source_key_id: key_id.to_string(),
            redemption_id: redemption_id.to_string(),
        };
        let r = call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.assign_subscription(r).await },
        )
        .await?;
        Ok((
            r.subscription
                .ok_or_else(|| missing("AssignSubscription.subscription"))?,
            r.already_assigned,
        ))
    }

    /// VoidRedemption: what a failed redemption was granted is taken back,
    /// any later grant for it refused, and the account it created removed
    /// if that holds nothing else.
    pub async fn void_redemption(
        &self,
        redemption_id: Uuid,
        created_user: Option<Uuid>,
    ) -> Result<(), Error> {
        let request = pb::VoidRedemptionRequest {
            redemption_id: redemption_id.to_string(),
            created_user_id: opt(created_user),
        };
        call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.void_redemption(r).await },
        )
        .await
        .map(drop)
    }

    /// One page of a class's active roster (optionally one user's seat).
    async fn roster_page(
        &self,
        class_id: &str,
        user_id: Option<Uuid>,
        page_size: i32,
        page_token: String,
    ) -> Result<pb::ListEnrollmentsResponse, Error> {
        let request = pb::ListEnrollmentsRequest {
            class_id: class_id.to_owned(),
            user_id: opt(user_id),
            page_size,
            page_token,
            include_cancelled: false,
        };
        call(
            ENROLLMENT,
            &self.enrollment,
            request,
            |mut c, r| async move { c.list_enrollments(r).await },
        )
        .await
    }

    /// The user ids holding a seat in a class (the whole roster, all pages).
    pub async fn roster(&self, class_id: Uuid) -> Result<Vec<String>, Error> {
        let mut users = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .roster_page(&class_id.to_string(), None, 1000, page_token)
                .await?;
            users.extend(page.enrollments.into_iter().map(|e| e.user_id));
            if page.next_page_token.is_empty() {
                return Ok(users);
            }
            page_token = page.next_page_token;
        }
    }

    /// The user's active seat in the class, if any.
    pub async fn seat(
        &self,
        class_id: &str,
        user_id: Uuid,
    ) -> Result<Option<pb::Enrollment>, Error> {
        let page = self
            .roster_page(class_id, Some(user_id), 1, String::new())
            .await?;
        Ok(page.enrollments.into_iter().next())
    }

    /// The user's unexpired subscription of the profile, if any.
    pub async fn subscription(
        &self,
        profile_id: &str,
        user_id: Uuid,
    ) -> Result<Option<pb::Subscription>, Error> {
        let mut page_token = String::new();
        loop {
            let request = pb::ListSubscriptionsRequest {
                user_id: user_id.to_string(),
                page_size: 1000,
                page_token,
            };
            let page = call(
                ENROLLMENT,
                &self.enrollment,
                request,
                |mut c, r| async move { c.list_subscriptions(r).await },
            )
            .await?;
            if let Some(held) = page
                .subscriptions
                .into_iter()
                .find(|s| s.profile_id == profile_id && s.active)
            {
                return Ok(Some(held));
            }
            if page.next_page_token.is_empty() {
                return Ok(None);
            }
            page_token = page.next_page_token;
        }
    }
}

fn opt(id: Option<Uuid>) -> String {
    id.map(|u| u.to_string()).unwrap_or_default()
}

fn missing(what: &str) -> Error {
    Error::Internal(format!("{what} missing from the response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_are_outages_and_reasons_are_kept() {
        let mut refused = tonic::Status::internal("h2 protocol error: http2 error");
        refused.set_source(std::sync::Arc::new(std::io::Error::other("reset")));
        assert!(matches!(
            from_status(ENROLLMENT, refused),
            Error::Unavailable(ENROLLMENT)
        ));
        let bug = tonic::Status::internal("internal error");
        assert!(matches!(
            from_status(ENROLLMENT, bug),
            Error::Upstream { .. }
        ));
        let full =
            trainingkeys_shared::error::status(Code::ResourceExhausted, "CLASS_FULL", "full");
        assert!(matches!(from_status(ENROLLMENT, full), Error::ClassFull));
    }
}
