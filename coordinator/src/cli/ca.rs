//! `cutover ca rotate|status` and `cutover operator renew`: the CA rotation
//! as operators drive and watch it, and an operator's own credentials.

use anyhow::{Context, Result};
use cutover_common::fsutil::write_atomic;
use cutover_common::pki::IssuedPair;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::{explain, ConnectArgs};
use super::nodes::{render_table, rfc3339};

/// Starts a CA rotation, then renews the caller's own credentials so this
/// CLI trusts the new CA before the coordinator presents it.
pub async fn rotate(connect: &ConnectArgs, json: bool) -> Result<()> {
    let mut client = connect.operator_client().await?;
    let status = client
        .rotate_ca(pb::RotateCaRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let cert = renew_own(connect, &mut client).await?;
    if json {
        let mut value = status_json(&status);
        value["renewed_cert"] = json!(cert);
        println!("{value}");
    } else {
        println!(
            "CA rotation to {} in progress; nodes renew on their own, and the old CA is retired when every node has\n\
             your credentials were renewed ({cert}); other operators run `cutover operator renew` before it finishes\n",
            status.new_ca
        );
        print!("{}", status_table(&status));
    }
    Ok(())
}

pub async fn status(connect: &ConnectArgs, json: bool) -> Result<()> {
    let status = connect
        .operator_client()
        .await?
        .get_ca_status(pb::GetCaStatusRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!("{}", status_json(&status));
    } else {
        print!("{}", status_table(&status));
    }
    Ok(())
}

/// `cutover operator renew`.
pub async fn renew(
    connect: &ConnectArgs,
    client: &mut OperatorServiceClient<Channel>,
    json: bool,
) -> Result<()> {
    let cert = renew_own(connect, client).await?;
    if json {
        println!("{}", json!({"cert": cert}));
    } else {
        println!("renewed: {cert} and its key, and the CA bundle beside them");
    }
    Ok(())
}

/// A new certificate for the caller on a key made here, and the current
/// trust bundle, written in place of the files the CLI config names.
/// Returns the certificate's path.
async fn renew_own(
    connect: &ConnectArgs,
    client: &mut OperatorServiceClient<Channel>,
) -> Result<String> {
    let files = connect.resolve()?.files;
    let identity = files
        .identity()?
        .with_context(|| format!("{} carries no cutover identity", files.cert.display()))?;
    let (csr_pem, key_pem) = cutover_common::pki::certificate_request(&identity)?;
    let answer = client
        .renew_operator_certificate(pb::RenewOperatorCertificateRequest { csr_pem })
        .await
        .map_err(explain)?
        .into_inner();
    // Trust first: the bundle holds both the CA the coordinator presents
    // now and the one it will. One this CLI could not load is not written.
    let bundle = cutover_common::tls::parse_bundle(&answer.ca_bundle_pem)?;
    let issuer = rustls_pemfile::certs(&mut answer.cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .and_then(|der| cutover_common::identity::certificate_facts(&der).ok())
        .map(|f| f.issuer)
        .context("the coordinator's answer holds no certificate")?;
    if !bundle.iter().any(|ca| ca.subject == issuer) {
        anyhow::bail!("the CA bundle sent does not hold {issuer}, the CA of the new certificate; nothing was written");
    }
    write_atomic(&files.ca_cert, answer.ca_bundle_pem.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", files.ca_cert.display()))?;
    IssuedPair {
        cert_pem: answer.cert_pem,
        key_pem,
    }
    .replace(&files.cert, &files.key)?;
    Ok(files.cert.display().to_string())
}

fn optional_time(ms: i64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        json!(rfc3339(ms))
    }
}

fn status_json(status: &pb::CaStatus) -> Value {
    json!({
        "phase": status.phase,
        "new_ca": status.new_ca,
        "started_at": optional_time(status.started_at_ms),
        "started_by": status.started_by,
        "retired_at": optional_time(status.retired_at_ms),
        "finished_at": optional_time(status.finished_at_ms),
        "cas": status.cas.iter().map(|ca| json!({
            "name": ca.name,
            "fingerprint": ca.fingerprint,
            "expires_at": rfc3339(ca.not_after_ms),
            "signing": ca.signing,
        })).collect::<Vec<_>>(),
        "nodes": status.nodes.iter().map(|n| json!({
            "name": n.name,
            "connected": n.connected,
            "cert_ca": n.cert_ca,
            "current_bundle": n.current_bundle,
            "moved": n.moved,
            "revoked": n.revoked,
            "waiting_because": n.waiting_because,
        })).collect::<Vec<_>>(),
    })
}

fn status_table(status: &pb::CaStatus) -> String {
    let mut out = match status.phase.as_str() {
        "none" => "no CA rotation has run\n".to_string(),
        phase => format!(
            "rotation to {}: {phase} (started {} by {}{}{})\n",
            status.new_ca,
            rfc3339(status.started_at_ms),
            status.started_by,
            if status.retired_at_ms == 0 {
                String::new()
            } else {
                format!(", old CA retired {}", rfc3339(status.retired_at_ms))
            },
            if status.finished_at_ms == 0 {
                String::new()
            } else {
                format!(", finished {}", rfc3339(status.finished_at_ms))
            },
        ),
    };
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let mut cas = vec![["CA", "FINGERPRINT", "EXPIRES", "SIGNING"]
        .map(String::from)
        .to_vec()];
    cas.extend(status.cas.iter().map(|ca| {
        vec![
            ca.name.clone(),
            ca.fingerprint.clone(),
            rfc3339(ca.not_after_ms),
            yes(ca.signing),
        ]
    }));
    out.push('\n');
    out.push_str(&render_table(&cas));
    let mut nodes = vec![[
        "NODE",
        "CONNECTED",
        "CERTIFICATE CA",
        "CURRENT BUNDLE",
        "MOVED",
    ]
    .map(String::from)
    .to_vec()];
    nodes.extend(status.nodes.iter().map(|n| {
        vec![
            n.name.clone(),
            yes(n.connected),
            n.cert_ca.clone(),
            yes(n.current_bundle),
            if n.revoked {
                "revoked (not waited for)".into()
            } else if !n.waiting_because.is_empty() {
                format!("no: {}", n.waiting_because)
            } else {
                yes(n.moved)
            },
        ]
    }));
    out.push('\n');
    out.push_str(&render_table(&nodes));
    out
}
