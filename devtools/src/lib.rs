//! Development PKI and tokens, for `make run`, the README's examples and
//! the tests: a local CA and a certificate per service, an ES256 signing key
//! with the JWKS that verifies it, and tokens for any role. Nothing here is
//! used by a service; production brings its own CA and identity provider.

use std::path::Path;

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
pub use trainingkeys_shared::auth::{Bearer, Claims};
use trainingkeys_shared::policy::Role;
use trainingkeys_shared::tls::Tls;

/// The issuer `make run`'s tokens carry (the services' default `JWT_ISSUER`).
pub const ISSUER: &str = "trainingkeys-dev";
/// The audience they name (the services' default `JWT_AUDIENCE`).
pub const AUDIENCE: &str = "trainingkeys";
/// The services, each with a certificate for its name.
pub const SERVICES: [&str; 3] = ["enrollment", "key-issuance", "redemption"];

/// A certificate authority that signs leaf certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, both PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), usable as a
    /// server and as a client certificate.
    pub fn leaf(&self, names: &[&str]) -> anyhow::Result<Leaf> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for service `name`, also valid for `localhost` and
    /// 127.0.0.1 so local clients can verify it.
    pub fn service(&self, name: &str) -> anyhow::Result<Leaf> {
        self.leaf(&[name, "localhost", "127.0.0.1"])
    }
}

/// A JWT signing key and the key id its JWKS names.
#[derive(Clone)]
pub struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
    kid: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl Signer {
    /// A fresh ES256 key.
    pub fn generate() -> anyhow::Result<Self> {
        let pem = KeyPair::generate()?.serialize_pem();
        Self::from_pem(&pem, Algorithm::ES256)
    }

    /// The key in `pem` (EC for ES*, RSA for RS*).
    pub fn from_pem(pem: &str, algorithm: Algorithm) -> anyhow::Result<Self> {
        let key = match algorithm {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                EncodingKey::from_rsa_pem(pem.as_bytes())?
            }
            _ => EncodingKey::from_ec_pem(pem.as_bytes())?,
        };
        let digest = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, pem.as_bytes());
        Ok(Self {
            key,
            algorithm,
            kid: digest.simple().to_string(),
            key_pem: pem.to_owned(),
        })
    }

    /// Its public key as one JWK, with `kid` and `alg`.
    pub fn jwk(&self) -> anyhow::Result<serde_json::Value> {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.key, self.algorithm)?;
        jwk.common.key_id = Some(self.kid.clone());
        Ok(serde_json::to_value(jwk)?)
    }

    /// A JWKS holding this key and `others` (keys being rotated in or out).
    pub fn jwks(&self, others: &[&Signer]) -> anyhow::Result<String> {
        let keys = std::iter::once(self)
            .chain(others.iter().copied())
            .map(Signer::jwk)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(serde_json::to_string_pretty(
            &serde_json::json!({ "keys": keys }),
        )?)
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }

    /// A token for `sub` with `roles` in `orgs`, valid for `ttl_seconds`
    /// from now, with the development issuer and audience.
    pub fn token(
        &self,
        sub: &str,
        roles: &[&str],
        orgs: &[&str],
        ttl_seconds: u64,
    ) -> anyhow::Result<String> {
        let now = now();
        self.sign(&Claims {
            sub: sub.to_owned(),
            orgs: orgs.iter().map(|o| (*o).to_owned()).collect(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            exp: now + ttl_seconds,
            nbf: Some(now.saturating_sub(1)),
        })
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a development CA, a certificate per service, a signing key and
/// its JWKS into `dir` (mode 0700, keys 0600), unless they are there:
/// `ca.pem`, `<service>.pem`, `<service>-key.pem`,
/// `client.pem`, `client-key.pem`, `load-balancer-bundle.pem`,
/// `signing-key.pem`, `jwks.json`.
pub fn init(dir: &Path) -> anyhow::Result<()> {
    let made = [
        "ca.pem",
        "jwks.json",
        "client.pem",
        "load-balancer-bundle.pem",
    ];
    if made.iter().all(|file| dir.join(file).exists()) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode(dir, 0o700)?;
    let ca = Ca::new("Training Keys development CA")?;
    write(&dir.join("ca.pem"), &ca.cert_pem(), 0o644)?;
    for service in SERVICES {
        let leaf = ca.service(service)?;
        write(&dir.join(format!("{service}.pem")), &leaf.cert_pem, 0o644)?;
        write(
            &dir.join(format!("{service}-key.pem")),
            &leaf.key_pem,
            0o600,
        )?;
    }
    // Tools' client certificate (no service identity).
    let client = ca.service("dev-client")?;
    write(&dir.join("client.pem"), &client.cert_pem, 0o644)?;
    write(&dir.join("client-key.pem"), &client.key_pem, 0o600)?;
    // `make run REPLICAS=N`'s haproxy: certificate and key in one file.
    let lb = ca.service("load-balancer")?;
    write(
        &dir.join("load-balancer-bundle.pem"),
        &format!("{}{}", lb.cert_pem, lb.key_pem),
        0o600,
    )?;
    let signer = Signer::generate()?;
    write(&dir.join("signing-key.pem"), &signer.key_pem, 0o600)?;
    write(&dir.join("jwks.json"), &signer.jwks(&[])?, 0o644)?;
    Ok(())
}

/// The signer whose key `init` wrote into `dir`.
pub fn signer(dir: &Path) -> anyhow::Result<Signer> {
    let path = dir.join("signing-key.pem");
    let pem = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (run `tk-dev init` first)", path.display()))?;
    Signer::from_pem(&pem, Algorithm::ES256)
}

fn write(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// A client of `make run`'s services, from what `init` wrote: TLS with
/// the development CA, and tokens signed with its key.
pub struct DevClient {
    tls: Tls,
    signer: Signer,
}

/// A channel whose calls carry a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

impl DevClient {
    /// Reads `dir` (made by [`init`]).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        trainingkeys_shared::tls::install_provider();
        let tls = Tls::from_files(
            dir.join("client.pem"),
            dir.join("client-key.pem"),
            dir.join("ca.pem"),
        )
        .with_context(|| {
            format!(
                "reading {} (run `tk-dev init` or `make run` first)",
                dir.display()
            )
        })?;
        Ok(Self {
            tls,
            signer: signer(dir)?,
        })
    }

    /// A lazily connecting TLS channel to `url` (`https://...`); calls give
    /// up after `timeout`.
    pub fn channel(&self, url: &str, timeout: std::time::Duration) -> anyhow::Result<Channel> {
        trainingkeys_shared::server::channel(url, timeout, Some(&self.tls))
    }

    /// An operator's token for `orgs`: every role but student, for an hour.
    pub fn operator(&self, orgs: &[&str]) -> anyhow::Result<Bearer> {
        let roles: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|r| *r != Role::Student)
            .map(Role::name)
            .collect();
        Bearer::new(&self.signer.token("dev-operator", &roles, orgs, 3600)?)
    }

    /// `channel` with `bearer` on every call.
    pub fn authed(
        &self,
        url: &str,
        timeout: std::time::Duration,
        bearer: &Bearer,
    ) -> anyhow::Result<Authed> {
        Ok(InterceptedService::new(
            self.channel(url, timeout)?,
            bearer.clone(),
        ))
    }
}
