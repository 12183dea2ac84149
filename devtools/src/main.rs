//! `tk-dev`: the development CA, certificates and tokens `make run` uses.
//!
//! ```text
//! tk-dev init  --dir .run/dev                   # CA, service certificates, signing key, JWKS
//! tk-dev token --dir .run/dev --role student --org org-1 --sub <user id>
//! tk-dev policy                                 # the roles table, as the README shows it
//! ```

use std::path::PathBuf;

use clap::Parser as _;

#[derive(clap::Parser)]
#[command(
    name = "tk-dev",
    about = "Development CA, certificates and tokens for Training Keys"
)]
enum Command {
    /// Writes a CA, a certificate per service, a signing key and its JWKS
    /// into DIR (kept if already there).
    Init {
        /// Where to write them.
        #[arg(long, default_value = ".run/dev")]
        dir: PathBuf,
    },
    /// Prints a bearer token signed with DIR's signing key.
    Token {
        /// Where `init` wrote the signing key.
        #[arg(long, default_value = ".run/dev")]
        dir: PathBuf,
        /// A role (repeatable): site_administrator, operations_manager,
        /// instructor, provisioning_service, redemption_front, student.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// An organization the token acts in (repeatable).
        #[arg(long = "org")]
        orgs: Vec<String>,
        /// The subject: a user id for students and staff, a name for services.
        #[arg(long, default_value = "dev")]
        sub: String,
        /// Seconds the token is valid.
        #[arg(long, default_value_t = 12 * 3600)]
        ttl: u64,
    },
    /// Prints the policy table (Markdown).
    Policy,
}

fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Init { dir } => trainingkeys_devtools::init(&dir),
        Command::Token {
            dir,
            roles,
            orgs,
            sub,
            ttl,
        } => {
            for role in &roles {
                anyhow::ensure!(
                    trainingkeys_shared::policy::Role::parse(role).is_some(),
                    "unknown role {role:?}"
                );
            }
            let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
            let orgs: Vec<&str> = orgs.iter().map(String::as_str).collect();
            let token = trainingkeys_devtools::signer(&dir)?.token(&sub, &roles, &orgs, ttl)?;
            println!("{token}");
            Ok(())
        }
        Command::Policy => {
            print!("{}", trainingkeys_shared::policy::markdown());
            Ok(())
        }
    }
}
