//! Seeding for load scenarios through the public API: an organization's
//! classes, event keys and registered students.

use chrono::{Duration, Utc};
use futures::future::join_all;
use trainingkeys_devtools::{Authed, Bearer, DevClient};
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_shared::peer;

/// Clients of the admin-side services.
#[derive(Clone)]
pub struct Admin {
    pub enrollment: EnrollmentServiceClient<Authed>,
    pub keys: KeyIssuanceServiceClient<Authed>,
    /// A fresh organization per run, so runs never collide.
    pub organization_id: String,
}

impl Admin {
    /// Clients of the services at these URLs.
    pub fn new(enrollment_url: &str, keys_url: &str) -> anyhow::Result<Self> {
        let (dev, bearer) = credentials()?;
        let channel = |url: &str| dev.authed(url, std::time::Duration::from_secs(600), bearer);
        Ok(Self {
            enrollment: EnrollmentServiceClient::new(channel(enrollment_url)?),
            keys: KeyIssuanceServiceClient::new(channel(keys_url)?),
            organization_id: organization().to_owned(),
        })
    }

    /// A class of `max` students starting tomorrow, with an event key; returns
    /// (class id, code).
    pub async fn class_with_event_key(&self, max: i32) -> anyhow::Result<(String, String)> {
        let start = Utc::now() + Duration::days(1);
        let request = pb::CreateClassRequest {
            organization_id: self.organization_id.clone(),
            title: format!("Bench class of {max}"),
            course_id: "BENCH".into(),
            start_time: Some(to_timestamp(start)),
            end_time: Some(to_timestamp(start + Duration::days(1))),
            max_students: max,
            lab_access_days: 0,
            instructor_ids: Vec::new(),
        };
        // Seeding retries a call lost in transport (a connection aged out
        // under it), as every client must.
        let class = peer::call(|| {
            let (mut client, request) = (self.enrollment.clone(), request.clone());
            async move { client.create_class(request).await }
        })
        .await?
        .class
        .ok_or_else(|| anyhow::anyhow!("no class"))?;
        let request = pb::SetEventKeyRequest {
            class_id: class.class_id.clone(),
            ..Default::default()
        };
        let key = peer::call(|| {
            let (mut client, request) = (self.keys.clone(), request.clone());
            async move { client.set_event_key(request).await }
        })
        .await?
        .key
        .ok_or_else(|| anyhow::anyhow!("no key"))?;
        Ok((class.class_id, key.code))
    }

    /// `n` registered students; returns their ids.
    pub async fn students(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::with_capacity(n);
        let tag = uuid::Uuid::new_v4().simple().to_string();
        for chunk in (0..n).collect::<Vec<_>>().chunks(256) {
            let batch = join_all(chunk.iter().map(|i| {
                let c = self.enrollment.clone();
                let request = pb::RegisterUserRequest {
                    organization_id: self.organization_id.clone(),
                    email: format!("s{i}-{tag}@example.com"),
                    display_name: format!("Student {i}"),
                    ..Default::default()
                };
                async move {
                    peer::call(|| {
                        let (mut c, request) = (c.clone(), request.clone());
                        async move { c.register_user(request).await }
                    })
                    .await
                    .map(|r| r.user.map(|u| u.user_id))
                }
            }))
            .await;
            for r in batch {
                ids.push(r?.ok_or_else(|| anyhow::anyhow!("no user"))?);
            }
        }
        Ok(ids)
    }

    /// `n` classes of `max` with an event key each, made 64 at a time:
    /// (class id, code) pairs.
    pub async fn classes_with_event_keys(
        &self,
        n: usize,
        max: i32,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut made = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
            let batch = join_all(chunk.iter().map(|_| self.class_with_event_key(max))).await;
            for class in batch {
                made.push(class?);
            }
        }
        Ok(made)
    }

    /// Enrolled count of a class.
    pub async fn enrolled(&self, class_id: &str) -> anyhow::Result<i32> {
        let class = self
            .enrollment
            .clone()
            .get_class(pb::GetClassRequest {
                class_id: class_id.to_owned(),
            })
            .await?
            .into_inner()
            .class
            .ok_or_else(|| anyhow::anyhow!("no class"))?;
        Ok(class.enrolled_count)
    }
}

/// This run's organization: a fresh one per process, so runs never collide.
pub fn organization() -> &'static str {
    static ORG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ORG.get_or_init(|| format!("org-{}", uuid::Uuid::new_v4().simple()))
}

/// TLS and an operator's token for [`organization`], from `make run`'s
/// development CA and signing key (`TK_DEV_DIR`, default `.run/dev`).
pub fn credentials() -> anyhow::Result<(&'static DevClient, &'static Bearer)> {
    static CREDENTIALS: std::sync::OnceLock<(DevClient, Bearer)> = std::sync::OnceLock::new();
    if let Some((dev, bearer)) = CREDENTIALS.get() {
        return Ok((dev, bearer));
    }
    let dir = std::env::var("TK_DEV_DIR").unwrap_or_else(|_| ".run/dev".into());
    let dev = DevClient::open(std::path::Path::new(&dir))?;
    let bearer = dev.operator(&[organization()])?;
    let (dev, bearer) = CREDENTIALS.get_or_init(|| (dev, bearer));
    Ok((dev, bearer))
}

/// `make demo`: seeds data and prints ready-to-paste redeem calls.
pub async fn demo(targets: &crate::Targets) -> anyhow::Result<()> {
    let admin = Admin::new(&targets.enrollment, &targets.keys)?;
    let org = &admin.organization_id;
    let (class_id, event_code) = admin.class_with_event_key(3).await?;
    let profile = admin
        .enrollment
        .clone()
        .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
            organization_id: org.clone(),
            name: "All access".into(),
            course_ids: vec!["RUST-101".into(), "GO-101".into()],
            duration_days: 90,
        })
        .await?
        .into_inner()
        .profile
        .ok_or_else(|| anyhow::anyhow!("no profile"))?;
    let pool = admin
        .keys
        .clone()
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile.profile_id.clone(),
            count: 5,
            pool_name: "Demo pool".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .pool
        .ok_or_else(|| anyhow::anyhow!("no pool"))?;
    let keys = admin
        .keys
        .clone()
        .list_keys(pb::ListKeysRequest {
            scope: Some(pb::list_keys_request::Scope::PoolId(pool.pool_id.clone())),
            ..Default::default()
        })
        .await?
        .into_inner()
        .keys;
    let sub_code = keys.first().map(|k| k.code.clone()).unwrap_or_default();
    let r = targets.target.trim_start_matches("https://");
    let k = targets.keys.trim_start_matches("https://");
    let dir = std::env::var("TK_DEV_DIR").unwrap_or_else(|_| ".run/dev".into());
    let front = trainingkeys_devtools::signer(std::path::Path::new(&dir))?.token(
        "demo-front",
        &["redemption_front"],
        &[org],
        12 * 3600,
    )?;
    let admin_token = trainingkeys_devtools::signer(std::path::Path::new(&dir))?.token(
        "demo-admin",
        &["site_administrator"],
        &[org],
        12 * 3600,
    )?;
    println!("Seeded organization {org}:");
    println!("  class {class_id} (3 seats) with event key {event_code}");
    println!(
        "  subscription profile {} with pool {} of 5 keys, e.g. {sub_code}",
        profile.profile_id, pool.pool_id
    );
    println!();
    println!("Tokens for this organization (a redemption front, a site administrator):");
    println!("  FRONT={front}");
    println!("  ADMIN={admin_token}");
    println!();
    println!("Validate and redeem the event key (a new student registers on the spot):");
    println!(
        "  grpcurl -cacert {dir}/ca.pem -H \"authorization: Bearer $FRONT\" -d '{{\"code\":\"{event_code}\"}}' {r} trainingkeys.v1.RedemptionService/ValidateKey"
    );
    for (i, name) in ["ada", "grace", "linus", "barbara"].iter().enumerate() {
        println!(
            "  grpcurl -cacert {dir}/ca.pem -H \"authorization: Bearer $FRONT\" -d '{{\"code\":\"{event_code}\",\"new_user\":{{\"organization_id\":\"{org}\",\"email\":\"{name}@example.com\",\"display_name\":\"{name}\"}},\"idempotency_key\":\"demo-{i}-{name}\"}}' {r} trainingkeys.v1.RedemptionService/RedeemKey"
        );
    }
    println!("  (the fourth student gets RESOURCE_EXHAUSTED CLASS_FULL)");
    println!();
    println!("Redeem a subscription key:");
    println!(
        "  grpcurl -cacert {dir}/ca.pem -H \"authorization: Bearer $FRONT\" -d '{{\"code\":\"{sub_code}\",\"new_user\":{{\"organization_id\":\"{org}\",\"email\":\"ada@example.com\",\"display_name\":\"Ada\"}},\"idempotency_key\":\"demo-sub-ada\"}}' {r} trainingkeys.v1.RedemptionService/RedeemKey"
    );
    println!();
    println!("Export the pool as CSV (base64 chunks):");
    println!(
        "  grpcurl -cacert {dir}/ca.pem -H \"authorization: Bearer $ADMIN\" -d '{{\"pool_id\":\"{}\"}}' {k} trainingkeys.v1.KeyIssuanceService/ExportKeys",
        pool.pool_id
    );
    Ok(())
}
