//! The gRPC transport of RedemptionService: validates the request, works out
//! who the caller is (for the guessing limits), calls the flow.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

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
    trusted_proxies: Vec<IpNet>,
}

impl RedemptionGrpc {
    /// The service over `redeemer`, believing `x-forwarded-for` only from
    /// `trusted_proxies`.
    pub fn new(redeemer: Arc<Redeemer>, trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            redeemer,
            trusted_proxies,
        }
    }

    /// The caller's address, for the guessing limits: the connection's
    /// peer; when the peer is a trusted proxy, the right-most address of
    /// `x-forwarded-for` that is not a trusted proxy (the addresses to its
    /// left were written by the client, and prove nothing).
    fn caller<T>(&self, request: &Request<T>) -> String {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        let Some(peer) = request.remote_addr().map(|a| a.ip()) else {
            return "unknown".to_owned();
        };
        if !trusted(&peer) {
            return peer.to_string();
        }
        let forwarded = request
            .metadata()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        let mut caller = peer;
        for hop in forwarded.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if trusted(&ip) => caller = ip,
                Ok(ip) => return ip.to_string(),
                // Garbage where an address should be: stop believing.
                Err(_) => break,
            }
        }
        caller.to_string()
    }
}

/// Parses `TRUSTED_PROXIES`: comma-separated IPs or CIDR blocks.
pub fn trusted_proxies(value: &str) -> anyhow::Result<Vec<IpNet>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    anyhow::anyhow!("TRUSTED_PROXIES: {v:?} is not an IP address or CIDR block")
                })
        })
        .collect()
}

/// What a caller may redeem or validate for: a redemption front, any user
/// of its organizations; a student (and nothing more), only themselves.
/// Returns the organizations whose keys the caller may use, and whom the
/// guessing limits count the user's failures for (a front's own tally of
/// the user, or the student's).
fn access(
    caller: &Caller,
    user: Option<uuid::Uuid>,
    new_user: bool,
) -> Result<(std::collections::BTreeSet<String>, String), Error> {
    if caller.has(Role::RedemptionFront) {
        let front = caller.subject.as_deref().unwrap_or_default();
        return Ok((caller.orgs.clone(), format!("front:{front}/")));
    }
    let own = caller
        .subject
        .as_deref()
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    if new_user || (user.is_some() && user != own) {
        return Err(Error::OwnSubjectOnly);
    }
    Ok((caller.orgs.clone(), String::new()))
}

/// The user a ValidateKey counts against: the one named, or a student
/// validating without naming themselves (so a student's guesses are
/// reserved and counted in their own name either way).
fn validating_user(caller: &Caller, named: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
    named.or_else(|| {
        (!caller.has(Role::RedemptionFront))
            .then(|| {
                caller
                    .subject
                    .as_deref()
                    .and_then(|s| uuid::Uuid::parse_str(s).ok())
            })
            .flatten()
    })
}

#[tonic::async_trait]
impl RedemptionService for RedemptionGrpc {
    async fn validate_key(
        &self,
        request: Request<pb::ValidateKeyRequest>,
    ) -> Result<Response<pb::ValidateKeyResponse>, Status> {
        let who = Caller::of(&request);
        let caller = self.caller(&request);
        let r = request.into_inner();
        let code = domain::code(&r.code).map_err(Error::from)?;
        let user_id = validate::optional_id("user_id", &r.user_id).map_err(Error::from)?;
        let (orgs, counted_as) = access(&who, user_id, false)?;
        let user_id = validating_user(&who, user_id);
        Ok(Response::new(
            self.redeemer
                .validate(&code, user_id, &caller, &orgs, &counted_as)
                .await?,
        ))
    }

    async fn redeem_key(
        &self,
        request: Request<pb::RedeemKeyRequest>,
    ) -> Result<Response<pb::RedeemKeyResponse>, Status> {
        let who = Caller::of(&request);
        let caller = self.caller(&request);
        let answer = match RedeemCommand::try_from(request.into_inner()) {
            Ok(mut cmd) => {
                let (user, new) = match &cmd.who {
                    domain::Who::Existing(id) => (Some(*id), false),
                    domain::Who::New(_) => (None, true),
                };
                match access(&who, user, new) {
                    Ok((orgs, counted_as)) => {
                        cmd.orgs = Some(orgs);
                        cmd.counted_as = counted_as;
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
