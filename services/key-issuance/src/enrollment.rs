//! What this service asks the enrollment service (over gRPC only: it never
//! reads enrollment's tables): a class's current dates and size, and whether a
//! subscription profile exists. Enrollment's statuses become this service's
//! own errors here, never passed through.

use std::time::Duration;

use tonic::Code;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_shared::peer;
use uuid::Uuid;

use crate::domain::ClassInfo;
use crate::error::Error;

/// The generated client, each call observed (a client span, its trace
/// context sent along, its duration).
type Client = EnrollmentServiceClient<trainingkeys_shared::rpc::Client>;

/// A cheap-to-clone handle on the enrollment service.
#[derive(Clone)]
pub struct Enrollment {
    client: Client,
}

impl Enrollment {
    /// A lazily-connecting client of the enrollment service at `url`.
    pub fn connect(
        url: &str,
        call_timeout: Duration,
        tls: Option<&trainingkeys_shared::tls::Tls>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: EnrollmentServiceClient::new(trainingkeys_shared::server::peer(
                url,
                call_timeout,
                tls,
            )?),
        })
    }

    /// The class `class_id` with its current dates.
    pub async fn class(&self, class_id: Uuid) -> Result<ClassInfo, Error> {
        let request = pb::GetClassRequest {
            class_id: class_id.to_string(),
        };
        let client = &self.client;
        let class = peer::call(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.get_class(request).await }
        })
        .await
        .map_err(|s| convert(s, "CLASS_NOT_FOUND", Error::ClassNotFound(class_id)))?
        .class
        .ok_or_else(|| Error::Enrollment(tonic::Status::internal("GetClass returned no class")))?;
        let time = |t: Option<&prost_types::Timestamp>| {
            t.and_then(trainingkeys_proto::time::from_timestamp)
                .ok_or_else(|| {
                    Error::Enrollment(tonic::Status::internal(
                        "GetClass returned a class without dates",
                    ))
                })
        };
        Ok(ClassInfo {
            class_id,
            organization_id: class.organization_id,
            instructor_ids: class.instructor_ids,
            title: class.title,
            start_time: time(class.start_time.as_ref())?,
            end_time: time(class.end_time.as_ref())?,
            lab_access_end_time: time(class.lab_access_end_time.as_ref())?,
            max_students: class.max_students,
        })
    }

    /// The organization of the profile; fails when it does not exist.
    pub async fn profile_organization(&self, profile_id: Uuid) -> Result<String, Error> {
        let request = pb::GetSubscriptionProfileRequest {
            profile_id: profile_id.to_string(),
        };
        let client = &self.client;
        peer::call(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.get_subscription_profile(request).await }
        })
        .await
        .map_err(|s| convert(s, "PROFILE_NOT_FOUND", Error::ProfileNotFound(profile_id)))?
        .profile
        .map(|p| p.organization_id)
        .ok_or_else(|| {
            Error::Enrollment(tonic::Status::internal(
                "GetSubscriptionProfile returned no profile",
            ))
        })
    }
}

use trainingkeys_proto::prost_types;

/// Maps an enrollment status: outages (by the error types behind them)
/// become [`Error::EnrollmentUnavailable`], the expected NOT_FOUND becomes
/// `not_found`, anything else is an unexpected answer (INTERNAL here, with
/// the details in the log).
fn convert(status: tonic::Status, not_found_reason: &str, not_found: Error) -> Error {
    if peer::classify(&status) != peer::Failure::Answer {
        return Error::EnrollmentUnavailable(status);
    }
    match status.code() {
        Code::NotFound
            if trainingkeys_shared::error::reason(&status).as_deref() == Some(not_found_reason) =>
        {
            not_found
        }
        _ => Error::Enrollment(status),
    }
}
