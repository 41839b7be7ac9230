//! `brink server token`: bootstrap tokens for nodes joining the site, written through
//! the Kubernetes API with the admin kubeconfig (as `kubeadm token` does with admin.conf).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use brink_proto::bootstrap::{self as tokens, BootstrapToken};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Manage the bootstrap tokens nodes join with.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; prints it (and, with --print-join-command, the node's join command).
    Create(CreateArgs),
    /// List the tokens (their secrets hidden).
    List(Common),
    /// Delete a token (by ID or whole token): nodes can no longer join with it.
    Delete {
        #[command(flatten)]
        common: Common,
        /// The token's ID (`abcdef`) or the whole token.
        token: String,
    },
}

#[derive(Debug, Args)]
pub struct Common {
    /// A member's data directory (its admin kubeconfig and CA are used).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The kubeconfig to write with (default: DATA_DIR/pki/admin.kubeconfig).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    common: Common,
    /// How long the token may be used (0s: until deleted).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    ttl: Duration,
    /// A note shown by `token list`.
    #[arg(long, default_value = "")]
    description: String,
    /// Also print the `brink node` command that joins with this token.
    #[arg(long)]
    print_join_command: bool,
}

impl Common {
    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| crate::default_data_dir("server"))
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.kubeconfig.clone().unwrap_or_else(|| {
            brink_control::peers::pki::pki_dir(&self.data_dir()).join("admin.kubeconfig")
        })
    }

    async fn secrets(&self) -> anyhow::Result<(Api<Secret>, String)> {
        let path = self.kubeconfig_path();
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)
            .with_context(|| format!("read {}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .with_context(|| format!("use {}", path.display()))?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).context("a client for the site")?;
        Ok((Api::namespaced(client, "kube-system"), server))
    }
}

pub async fn run(command: ServerCommand) -> anyhow::Result<()> {
    let ServerCommand::Token(command) = command;
    match command {
        TokenCommand::Create(args) => create(args).await,
        TokenCommand::List(common) => list(common).await,
        TokenCommand::Delete { common, token } => delete(common, &token).await,
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let (secrets, server) = args.common.secrets().await?;
    let token = BootstrapToken::generate()?;
    let expiration = (!args.ttl.is_zero())
        .then(|| {
            let ttl = jiff::SignedDuration::try_from(args.ttl).ok()?;
            jiff::Timestamp::now().checked_add(ttl).ok()
        })
        .map(|at| at.context("--ttl is too long"))
        .transpose()?
        .map(|at| at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    let object = token.secret(
        expiration.as_deref(),
        &args.description,
        &[tokens::NODE_TOKEN_GROUP],
    );
    let secret: Secret = serde_json::from_value(object).context("the token's Secret")?;
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .context("write the token's Secret")?;
    println!("{}", token.render());
    if args.print_join_command {
        let ca = brink_control::peers::pki::pki_dir(&args.common.data_dir()).join("ca.crt");
        let pem = std::fs::read(&ca).with_context(|| format!("read {}", ca.display()))?;
        use rustls::pki_types::pem::PemObject as _;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
        let pin = tokens::ca_public_key_hash(&der)?;
        println!(
            "brink node --server {} --token {} --discovery-token-ca-cert-hash {pin}",
            server.trim_end_matches('/'),
            token.render()
        );
    }
    Ok(())
}

async fn list(common: Common) -> anyhow::Result<()> {
    let (secrets, _) = common.secrets().await?;
    let list = secrets
        .list(&ListParams::default().fields("type=bootstrap.kubernetes.io/token"))
        .await
        .context("list tokens")?;
    let mut rows = vec![[
        "TOKEN".to_owned(),
        "EXPIRES".to_owned(),
        "USAGES".to_owned(),
        "DESCRIPTION".to_owned(),
        "EXTRA GROUPS".to_owned(),
    ]];
    for secret in list.items {
        let data = secret.data.unwrap_or_default();
        let get = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .unwrap_or_default()
        };
        let usages: Vec<&str> = ["authentication", "signing"]
            .into_iter()
            .filter(|u| get(&format!("usage-bootstrap-{u}")) == "true")
            .collect();
        rows.push([
            format!("{}.<hidden>", get("token-id")),
            Some(get("expiration"))
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "<never>".into()),
            usages.join(","),
            Some(get("description"))
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "<none>".into()),
            get("auth-extra-groups"),
        ]);
    }
    print!(
        "{}",
        crate::table::render(rows.into_iter().map(Vec::from).collect())
    );
    Ok(())
}

async fn delete(common: Common, token: &str) -> anyhow::Result<()> {
    let id = token.split('.').next().unwrap_or(token);
    anyhow::ensure!(
        id.len() == 6
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{token:?} is not a token ID (abcdef) or a token (abcdef.0123456789abcdef)"
    );
    let (secrets, _) = common.secrets().await?;
    secrets
        .delete(&format!("bootstrap-token-{id}"), &DeleteParams::default())
        .await
        .with_context(|| format!("delete token {id}"))?;
    println!("bootstrap token {id:?} deleted");
    Ok(())
}
