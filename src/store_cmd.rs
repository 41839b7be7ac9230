//! `brink store get|put|create|delete|list|watch`: a debugging client of a control-plane
//! member's store API.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The member's API address.
    #[arg(
        long,
        default_value = "127.0.0.1:2379",
        env = "BRINK_SERVER",
        global = true
    )]
    server: SocketAddr,
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Print a key's value and revisions (JSON).
    Get { key: String },
    /// Write a key (created if absent unless --expect-mod is given).
    Put {
        key: String,
        value: String,
        /// Only if the key's modRevision is this (compare-and-set).
        #[arg(long)]
        expect_mod: Option<u64>,
    },
    /// Create a key; fails if it exists.
    Create { key: String, value: String },
    /// Delete a key.
    Delete {
        key: String,
        #[arg(long)]
        expect_mod: Option<u64>,
    },
    /// List keys under a prefix (JSON lines), following pages.
    List {
        prefix: String,
        /// Keys per page.
        #[arg(long, default_value_t = 500)]
        limit: usize,
    },
    /// Print changes under a prefix as they happen (JSON lines).
    Watch {
        prefix: String,
        /// Start after this revision (0: from the beginning of history).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One request; the JSON answer, or the member's error message.
async fn call(
    client: &HttpClient,
    server: SocketAddr,
    method: hyper::Method,
    path_and_query: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let uri: hyper::Uri = format!("http://{server}{path_and_query}").parse()?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = client.request(request).await.with_context(|| {
        format!("cannot reach the member at {server} (is `brink server` running?)")
    })?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(
        |_| serde_json::json!({"error": String::from_utf8_lossy(&bytes).trim().to_string()}),
    );
    Ok((status, value))
}

fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn ok(status: u16, value: &serde_json::Value) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = value
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("unknown error");
    anyhow::bail!("{status}: {message}")
}

/// A key's value (JSON) with the answer's status.
async fn get(
    client: &HttpClient,
    server: SocketAddr,
    key: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let path = format!("/v0/get?key={}", query_escape(key));
    call(client, server, hyper::Method::GET, &path, None).await
}

/// One operation as a transaction; the revision it was applied at.
async fn write(
    client: &HttpClient,
    server: SocketAddr,
    op: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let body = serde_json::json!({"ops": [op]});
    let (status, answer) = call(client, server, hyper::Method::POST, "/v0/txn", Some(body)).await?;
    ok(status, &answer)?;
    Ok(answer["revision"].clone())
}

pub async fn store(args: StoreArgs) -> anyhow::Result<()> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let server = args.server;
    let mut out = std::io::stdout().lock();
    match args.command {
        StoreCommand::Get { key } => {
            let (status, value) = get(&client, server, &key).await?;
            ok(status, &value)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        StoreCommand::Put {
            key,
            value,
            expect_mod,
        } => {
            // Without a revision to compare, put means "create or update".
            let op = if expect_mod.is_some() {
                serde_json::json!({"op": "update", "key": key, "value": value, "expectMod": expect_mod})
            } else {
                let (status, _) = get(&client, server, &key).await?;
                let op = if status == 404 { "create" } else { "update" };
                serde_json::json!({"op": op, "key": key, "value": value})
            };
            let revision = write(&client, server, op).await?;
            writeln!(out, "revision {revision}")?;
        }
        StoreCommand::Create { key, value } => {
            let op = serde_json::json!({"op": "create", "key": key, "value": value});
            let revision = write(&client, server, op).await?;
            writeln!(out, "revision {revision}")?;
        }
        StoreCommand::Delete { key, expect_mod } => {
            let op = serde_json::json!({"op": "delete", "key": key, "expectMod": expect_mod});
            let revision = write(&client, server, op).await?;
            writeln!(out, "revision {revision}")?;
        }
        StoreCommand::List { prefix, limit } => {
            let mut token: Option<String> = None;
            loop {
                let mut path = format!("/v0/range?prefix={}&limit={limit}", query_escape(&prefix));
                if let Some(t) = &token {
                    path.push_str(&format!("&continue={}", query_escape(t)));
                }
                let (status, page) = call(&client, server, hyper::Method::GET, &path, None).await?;
                ok(status, &page)?;
                for item in page["items"].as_array().into_iter().flatten() {
                    writeln!(out, "{item}")?;
                }
                token = page["continue"].as_str().map(str::to_string);
                if token.is_none() {
                    break;
                }
            }
        }
        StoreCommand::Watch { prefix, mut after } => loop {
            let path = format!(
                "/v0/watch?prefix={}&after={after}&timeoutSeconds=30",
                query_escape(&prefix)
            );
            let (status, answer) = call(&client, server, hyper::Method::GET, &path, None).await?;
            ok(status, &answer)?;
            for event in answer["events"].as_array().into_iter().flatten() {
                writeln!(out, "{event}")?;
                after = after.max(event["revision"].as_u64().unwrap_or(after));
            }
            out.flush()?;
        },
    }
    Ok(())
}
