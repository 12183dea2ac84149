//! The tests' certificates and tokens: one development CA per test process,
//! a certificate per service (and for test clients and the load balancer),
//! an ES256 signing key and its JWKS, in a directory of the system's temporary
//! folder named for the process. Every
//! service under test serves TLS and verifies bearer tokens, as in production.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use trainingkeys_devtools::{Ca, Signer};
use trainingkeys_shared::config::CommonConfig;
use trainingkeys_shared::policy::Role;
use trainingkeys_shared::tls::Tls;

/// A channel whose calls carry a test token.
pub type Authed = InterceptedService<Channel, TestAuth>;

/// Names with a certificate: the services, a plain client, the load balancer.
const NAMES: [&str; 6] = [
    "enrollment",
    "key-issuance",
    "redemption",
    "test-client",
    "load-balancer",
    "redis",
];

/// The test process's CA, certificates and signing key.
pub struct Pki {
    /// Where the files are.
    pub dir: PathBuf,
    /// The CA (for tests that mint their own certificates).
    pub ca: Ca,
    /// The key the services' JWKS holds.
    pub signer: Signer,
}

/// The process's PKI, made on first use.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trainingkeys-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("Training Keys test CA").unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        for name in NAMES {
            let leaf = ca.service(name).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), &leaf.cert_pem).unwrap();
            std::fs::write(dir.join(format!("{name}-key.pem")), &leaf.key_pem).unwrap();
            // haproxy wants the certificate and its key in one file.
            std::fs::write(
                dir.join(format!("{name}-bundle.pem")),
                format!("{}{}", leaf.cert_pem, leaf.key_pem),
            )
            .unwrap();
        }
        let signer = Signer::generate().unwrap();
        std::fs::write(dir.join("jwks.json"), signer.jwks(&[]).unwrap()).unwrap();
        Pki { dir, ca, signer }
    })
}

impl Pki {
    /// `name`'s certificate and key files.
    pub fn files(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        )
    }

    /// The CA file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The JWKS file.
    pub fn jwks_file(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    /// TLS as `name` presents it (its certificate is its client identity).
    pub fn tls(&self, name: &str) -> Tls {
        let (cert, key) = self.files(name);
        Tls::from_files(cert, key, self.ca_file()).unwrap()
    }

    /// Points a service's settings at its certificate and the JWKS.
    pub fn configure(&self, common: &mut CommonConfig, name: &str) {
        let (cert, key) = self.files(name);
        common.tls.tls_cert_file = Some(cert);
        common.tls.tls_key_file = Some(key);
        common.tls.tls_ca_file = Some(self.ca_file());
        common.tls.plaintext = false;
        common.auth.jwks_file = Some(self.jwks_file());
    }
}

/// A TLS channel to `url` (`https://...`), presenting `identity`'s
/// certificate.
pub fn channel(url: &str, identity: &str) -> Channel {
    trainingkeys_shared::tls::install_provider();
    trainingkeys_shared::server::channel(
        url,
        std::time::Duration::from_secs(600),
        Some(&pki().tls(identity)),
    )
    .unwrap()
}

/// Every organization this test process made with [`org`](crate::org):
/// the harness's own token acts in all of them.
static ORGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records an organization for the harness's token.
pub fn register_org(org: &str) {
    ORGS.lock().unwrap().push(org.to_owned());
}

/// Adds a bearer token to every call: a fixed one, or the harness's
/// operator token (every role but student, in every organization made so
/// far), re-signed when a new organization appears.
#[derive(Clone)]
pub struct TestAuth {
    token: Option<MetadataValue<Ascii>>,
    operator: bool,
    cached: std::sync::Arc<Mutex<(usize, Option<MetadataValue<Ascii>>)>>,
}

impl TestAuth {
    /// The harness's operator token.
    pub fn operator() -> Self {
        Self {
            token: None,
            operator: true,
            cached: Default::default(),
        }
    }

    /// No token at all.
    pub fn none() -> Self {
        Self {
            token: None,
            operator: false,
            cached: Default::default(),
        }
    }

    /// A fixed token (any text: tests of bad tokens use this).
    pub fn token(token: &str) -> Self {
        Self {
            token: Some(format!("Bearer {token}").parse().unwrap()),
            operator: false,
            cached: Default::default(),
        }
    }

    /// A valid token for `sub` with `roles` in `orgs`.
    pub fn as_role(sub: &str, roles: &[Role], orgs: &[&str]) -> Self {
        let roles: Vec<&str> = roles.iter().map(|r| r.name()).collect();
        Self::token(&pki().signer.token(sub, &roles, orgs, 3600).unwrap())
    }

    fn operator_token(&self) -> MetadataValue<Ascii> {
        let orgs = ORGS.lock().unwrap().clone();
        let mut cached = self.cached.lock().unwrap();
        if cached.0 != orgs.len() || cached.1.is_none() {
            let roles: Vec<&str> = Role::ALL
                .into_iter()
                .filter(|r| *r != Role::Student)
                .map(Role::name)
                .collect();
            let orgs: Vec<&str> = orgs.iter().map(String::as_str).collect();
            let token = pki()
                .signer
                .token("test-operator", &roles, &orgs, 3600)
                .unwrap();
            *cached = (orgs.len(), Some(format!("Bearer {token}").parse().unwrap()));
        }
        cached.1.clone().unwrap()
    }
}

impl tonic::service::Interceptor for TestAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let token = if self.operator {
            Some(self.operator_token())
        } else {
            self.token.clone()
        };
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token);
        }
        Ok(request)
    }
}

/// A channel to `url` as a plain client with the operator token.
pub fn operator(url: &str) -> Authed {
    InterceptedService::new(channel(url, "test-client"), TestAuth::operator())
}
