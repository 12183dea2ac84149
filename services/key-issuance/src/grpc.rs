//! The gRPC transport: each handler turns its request into a validated
//! command, calls the service, and turns the result into a response.

use tonic::{Request, Response, Status};
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::get_key_request::Selector;
use trainingkeys_proto::v1::key_issuance_service_server::KeyIssuanceService;
use trainingkeys_proto::v1::{export_keys_request, list_keys_request};
use trainingkeys_shared::{InvalidField, page, validate};

use crate::domain::{self, GenerateClassKeys, GenerateSubscription, Scope, SetEventKey, UseOfKey};
use crate::error::Error;
use crate::export::ExportStream;
use crate::service::KeyService;
use crate::tenancy::Tenant;
use trainingkeys_proto::v1::KeyKind;

/// `KeyIssuanceService` over a [`KeyService`].
pub struct KeyIssuanceGrpc {
    service: KeyService,
}

impl KeyIssuanceGrpc {
    /// The transport over `service`.
    pub fn new(service: KeyService) -> Self {
        Self { service }
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn reply<T>(message: T) -> Reply<T> {
    Ok(Response::new(message))
}

fn invalid(e: InvalidField) -> Error {
    Error::from(e)
}

fn list_scope(scope: Option<&list_keys_request::Scope>) -> Result<Scope, InvalidField> {
    match scope {
        Some(list_keys_request::Scope::ClassId(c)) => Scope::from_ids(Some(c), None),
        Some(list_keys_request::Scope::PoolId(p)) => Scope::from_ids(None, Some(p)),
        None => Scope::from_ids(None, None),
    }
}

fn export_scope(scope: Option<&export_keys_request::Scope>) -> Result<Scope, InvalidField> {
    match scope {
        Some(export_keys_request::Scope::ClassId(c)) => Scope::from_ids(Some(c), None),
        Some(export_keys_request::Scope::PoolId(p)) => Scope::from_ids(None, Some(p)),
        None => Scope::from_ids(None, None),
    }
}

#[tonic::async_trait]
impl KeyIssuanceService for KeyIssuanceGrpc {
    async fn generate_subscription_keys(
        &self,
        request: Request<pb::GenerateSubscriptionKeysRequest>,
    ) -> Reply<pb::GenerateSubscriptionKeysResponse> {
        let tenant = Tenant::of(&request, "GenerateSubscriptionKeys");
        let cmd = GenerateSubscription::try_from(request.into_inner()).map_err(invalid)?;
        tenant.check_profile(&self.service, cmd.profile_id).await?;
        // Another organization's pool answers as a missing one (before its
        // profile could be compared with this one).
        if let domain::PoolChoice::Existing(pool_id) = cmd.pool {
            tenant
                .check_scope(
                    &self.service,
                    Scope::Pool(pool_id),
                    &[KeyKind::Subscription],
                )
                .await?;
        }
        reply(self.service.generate_subscription_keys(cmd).await?)
    }

    async fn generate_class_enrollment_keys(
        &self,
        request: Request<pb::GenerateClassEnrollmentKeysRequest>,
    ) -> Reply<pb::GenerateClassEnrollmentKeysResponse> {
        let tenant = Tenant::of(&request, "GenerateClassEnrollmentKeys");
        let cmd = GenerateClassKeys::try_from(request.into_inner()).map_err(invalid)?;
        let class = Scope::Class(cmd.class_id);
        tenant
            .check_scope(&self.service, class, &[KeyKind::ClassEnrollment])
            .await?;
        reply(self.service.generate_class_keys(cmd).await?)
    }

    async fn set_event_key(
        &self,
        request: Request<pb::SetEventKeyRequest>,
    ) -> Reply<pb::SetEventKeyResponse> {
        let tenant = Tenant::of(&request, "SetEventKey");
        let cmd = SetEventKey::try_from(request.into_inner()).map_err(invalid)?;
        let class = Scope::Class(cmd.class_id);
        tenant
            .check_scope(&self.service, class, &[KeyKind::Event])
            .await?;
        reply(
            self.service
                .set_event_key_as(cmd, tenant.outside_subject())
                .await?,
        )
    }

    async fn disable_event_key(
        &self,
        request: Request<pb::DisableEventKeyRequest>,
    ) -> Reply<pb::DisableEventKeyResponse> {
        let class_id = validate::id("class_id", &request.get_ref().class_id).map_err(invalid)?;
        Tenant::of(&request, "DisableEventKey")
            .check_scope(&self.service, Scope::Class(class_id), &[KeyKind::Event])
            .await?;
        reply(self.service.disable_event_key(class_id).await?)
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Reply<pb::GetKeyResponse> {
        let tenant = Tenant::of(&request, "GetKey");
        let key = match &request.get_ref().selector {
            Some(Selector::KeyId(id)) => {
                let key_id = validate::id("key_id", id).map_err(invalid)?;
                let key = self.service.get_key_by_id(key_id).await?;
                tenant
                    .check_key(&self.service, &key, Error::KeyNotFound(key_id))
                    .await?;
                key
            }
            Some(Selector::Code(code)) => {
                let normalized = domain::typed_code("code", code)?;
                // A look-up by code is a probe of the code space: misses
                // (missing, or another organization's) are limited per caller.
                let probe = match tenant.outside_subject() {
                    Some(subject) => Some(self.service.start_probe(subject).await?),
                    None => None,
                };
                let found = match self.service.get_key_by_code(&normalized).await {
                    Ok(key) => tenant
                        .check_key(&self.service, &key, Error::CodeNotFound)
                        .await
                        .map(|()| key),
                    Err(e) => Err(e),
                };
                if let Some(probe) = probe {
                    let missed = matches!(found, Err(Error::CodeNotFound));
                    self.service.end_probe(probe, missed).await?;
                }
                found?
            }
            None => {
                return Err(
                    invalid(InvalidField::new("key_id", "key_id or code is required")).into(),
                );
            }
        };
        reply(pb::GetKeyResponse { key: Some(key) })
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Reply<pb::ListKeysResponse> {
        let r = request.get_ref();
        let scope = list_scope(r.scope.as_ref()).map_err(invalid)?;
        let status = domain::status_filter(r.status).map_err(invalid)?;
        let limit = page::page_size(r.page_size).map_err(invalid)?;
        let after = page::decode(&r.page_token).map_err(invalid)?;
        let tenant = Tenant::of(&request, "ListKeys");
        let kinds = [
            KeyKind::Subscription,
            KeyKind::ClassEnrollment,
            KeyKind::Event,
        ];
        let class = tenant.check_scope(&self.service, scope, &kinds).await?;
        let mut page = self.service.list_keys(scope, status, after, limit).await?;
        // A page may come back shorter than asked: the token still goes on.
        page.keys
            .retain(|key| tenant.sees(key.kind(), class.as_ref()));
        reply(page)
    }

    type ExportKeysStream = ExportStream;

    async fn export_keys(
        &self,
        request: Request<pb::ExportKeysRequest>,
    ) -> Reply<Self::ExportKeysStream> {
        let r = request.get_ref();
        let scope = export_scope(r.scope.as_ref()).map_err(invalid)?;
        let status = domain::status_filter(r.status).map_err(invalid)?;
        // A class's export is its class enrollment keys' (operations
        // managers); a pool's, its subscription keys' (site administrators).
        let kind = match scope {
            Scope::Class(_) => KeyKind::ClassEnrollment,
            Scope::Pool(_) => KeyKind::Subscription,
        };
        let tenant = Tenant::of(&request, "ExportKeys");
        let class = tenant.check_scope(&self.service, scope, &[kind]).await?;
        // A class's event key only to those who may see it.
        let hidden = (!tenant.sees(KeyKind::Event, class.as_ref())).then_some(domain::Kind::Event);
        reply(self.service.export(scope, status, hidden).await?)
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Reply<pb::RevokeKeyResponse> {
        let key_id = validate::id("key_id", &request.get_ref().key_id).map_err(invalid)?;
        let tenant = Tenant::of(&request, "RevokeKey");
        let key = self.service.get_key_by_id(key_id).await?;
        tenant
            .check_key(&self.service, &key, Error::KeyNotFound(key_id))
            .await?;
        reply(self.service.revoke_key(key_id).await?)
    }

    async fn render_notification(
        &self,
        request: Request<pb::RenderNotificationRequest>,
    ) -> Reply<pb::RenderNotificationResponse> {
        let r = request.get_ref();
        let class_id = validate::id("class_id", &r.class_id).map_err(invalid)?;
        Tenant::of(&request, "RenderNotification")
            .check_scope(&self.service, Scope::Class(class_id), &[KeyKind::Event])
            .await?;
        if r.template.chars().count() > domain::MAX_TEMPLATE {
            let message = format!("must be at most {} characters", domain::MAX_TEMPLATE);
            return Err(invalid(InvalidField::new("template", message)).into());
        }
        let text = self
            .service
            .render_notification(class_id, &r.template)
            .await?;
        reply(pb::RenderNotificationResponse { text })
    }

    async fn resolve_key(
        &self,
        request: Request<pb::ResolveKeyRequest>,
    ) -> Reply<pb::ResolveKeyResponse> {
        let r = request.get_ref();
        let normalized = domain::typed_code("code", &r.code)?;
        let user_id = validate::optional_id("user_id", &r.user_id).map_err(invalid)?;
        reply(self.service.resolve_key(&normalized, user_id).await?)
    }

    async fn consume_key(
        &self,
        request: Request<pb::ConsumeKeyRequest>,
    ) -> Reply<pb::ConsumeKeyResponse> {
        let u = UseOfKey::try_from(request.into_inner()).map_err(invalid)?;
        let c = self.service.consume_key(u).await?;
        reply(pb::ConsumeKeyResponse {
            uses: c.uses,
            max_uses: c.max_uses,
            already_consumed: c.already_consumed,
        })
    }

    async fn release_key(
        &self,
        request: Request<pb::ReleaseKeyRequest>,
    ) -> Reply<pb::ReleaseKeyResponse> {
        let u = UseOfKey::try_from(request.into_inner()).map_err(invalid)?;
        reply(pb::ReleaseKeyResponse {
            released: self.service.release_key(u).await?,
        })
    }
}
