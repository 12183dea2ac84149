//! The gRPC transport of RedemptionService: validates the request, works out
//! who the caller is (for the guessing limits), calls the flow.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redemption_service_server::RedemptionService;
use trainingkeys_shared::auth::Caller;
use trainingkeys_shared::policy::Role;
use trainingkeys_shared::validate;

use crate::domain::{self, RedeemCommand};
use crate::error::Error;
use crate::metrics::METRICS;
use crate::redeem::Redeemer;

/// `RedemptionService` over a [`Redeemer`].
pub struct RedemptionGrpc {
    redeemer: Arc<Redeemer>,
}

impl RedemptionGrpc {
    /// The service over `redeemer`.
    pub fn new(redeemer: Arc<Redeemer>) -> Self {
        Self { redeemer }
    }
}

/// The caller for guessing limits: the first `x-forwarded-for` address (set by
/// the load balancer), else the peer address.
fn caller<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .or_else(|| request.remote_addr().map(|a| a.ip().to_string()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// What a caller may redeem or validate for: a redemption front, any user
/// of its organizations; a student (and nothing more), only themselves.
/// Returns the organizations whose keys the caller may use.
fn access(
    caller: &Caller,
    user: Option<uuid::Uuid>,
    new_user: bool,
) -> Result<std::collections::BTreeSet<String>, Error> {
    if !caller.has(Role::RedemptionFront) {
        let own = caller
            .subject
            .as_deref()
            .and_then(|s| uuid::Uuid::parse_str(s).ok());
        if new_user || (user.is_some() && user != own) {
            return Err(Error::OwnSubjectOnly);
        }
    }
    Ok(caller.orgs.clone())
}

#[tonic::async_trait]
impl RedemptionService for RedemptionGrpc {
    async fn validate_key(
        &self,
        request: Request<pb::ValidateKeyRequest>,
    ) -> Result<Response<pb::ValidateKeyResponse>, Status> {
        let who = Caller::of(&request);
        let caller = caller(&request);
        let r = request.into_inner();
        let code = domain::code(&r.code).map_err(Error::from)?;
        let user_id = validate::optional_id("user_id", &r.user_id).map_err(Error::from)?;
        let orgs = access(&who, user_id, false)?;
        Ok(Response::new(
            self.redeemer
                .validate(&code, user_id, &caller, &orgs)
                .await?,
        ))
    }

    async fn redeem_key(
        &self,
        request: Request<pb::RedeemKeyRequest>,
    ) -> Result<Response<pb::RedeemKeyResponse>, Status> {
        let who = Caller::of(&request);
        let caller = caller(&request);
        let answer = match RedeemCommand::try_from(request.into_inner()) {
            Ok(mut cmd) => {
                let (user, new) = match &cmd.who {
                    domain::Who::Existing(id) => (Some(*id), false),
                    domain::Who::New(_) => (None, true),
                };
                match access(&who, user, new) {
                    Ok(orgs) => {
                        cmd.orgs = Some(orgs);
                        self.redeemer.redeem(cmd, &caller).await
                    }
                    Err(refused) => Err(refused),
                }
            }
            Err(invalid) => Err(Error::from(invalid)),
        };
        METRICS.redeemed(answer.as_ref().map_or_else(Error::reason, |_| "OK"));
        Ok(Response::new(answer?))
    }
}
