//! The `prometheus` and `web` providers: one HTTP GET per sample, its
//! answer reduced to one number (`result` in the condition). A measurement
//! that fails (no answer, not 2xx, no number where expected) has no
//! verdict: the sample counts as inconclusive, with the reason.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{HeaderValue, Provider};

/// The most of an answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// One step of a JSON path: a key or an index.
#[derive(Debug, PartialEq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// `$.data.errors`, `$.items[0].value`, `data.errors` or empty (the whole
/// document).
fn steps(path: &str) -> Result<Vec<Step<'_>>, String> {
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let (index, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("{path:?}: a '[' is not closed"))?;
            let index = index
                .parse()
                .map_err(|_| format!("{path:?}: [{index}] is not an array index"))?;
            out.push(Step::Index(index));
            rest = after;
        }
        if !rest.is_empty() {
            return Err(format!("{path:?}: {rest:?} after an index"));
        }
    }
    Ok(out)
}

pub fn check_json_path(path: &str) -> Result<(), String> {
    steps(path).map(|_| ())
}

/// The number at `path` in `document` (a number, or a string holding one,
/// as Prometheus writes its values).
fn number_at(document: &Value, path: &str) -> Result<f64, String> {
    let mut at = document;
    for step in steps(path)? {
        at = match step {
            Step::Key(key) => at.get(key),
            Step::Index(i) => at.get(i),
        }
        .ok_or_else(|| format!("the answer has nothing at {path:?}"))?;
    }
    let value: f64 = match at {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number"))?,
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} at {path:?} is not a number"))?,
        other => return Err(format!("{other} at {path:?} is not a number")),
    };
    finite(value)
}

/// Prometheus answers NaN for 0/0 (a ratio without traffic) and Inf: no
/// data to judge, not a failure.
fn finite(value: f64) -> Result<f64, String> {
    match value.is_finite() {
        true => Ok(value),
        false => Err(format!(
            "the value is {value} (no data to judge: a ratio of nothing?)"
        )),
    }
}

/// Measures `provider` (prometheus or web) once: the value of `result`,
/// or why there is none. `secrets`: the values of the secrets its headers
/// name, by name.
pub async fn measure(
    provider: &Provider,
    secrets: &BTreeMap<String, String>,
) -> Result<f64, String> {
    match provider {
        Provider::Prometheus {
            address,
            query,
            timeout_ms,
        } => {
            let url = format!(
                "{}/api/v1/query?query={}",
                address.trim_end_matches('/'),
                percent_encode(query)
            );
            let answer = get(&url, &[], *timeout_ms).await?;
            prometheus_value(&answer)
        }
        Provider::Web {
            url,
            json_path,
            headers,
            timeout_ms,
        } => {
            let headers = headers
                .iter()
                .map(|(name, value)| {
                    let value = match value {
                        HeaderValue::Plain(text) => text.as_str(),
                        HeaderValue::Secret { secret } => {
                            secrets.get(secret).map(String::as_str).ok_or_else(|| {
                                format!("header {name}: secret {secret} was not read")
                            })?
                        }
                    };
                    Ok((name.as_str(), value))
                })
                .collect::<Result<Vec<_>, String>>()?;
            // An endpoint may echo a credential it refused: no secret
            // goes into a sample's note.
            let answer = get(url, &headers, *timeout_ms).await.map_err(|error| {
                secrets
                    .values()
                    .filter(|v| !v.is_empty())
                    .fold(error, |error, value| {
                        error.replace(value.as_str(), "[secret]")
                    })
            })?;
            match json_path.as_str() {
                "" => {
                    let text = String::from_utf8_lossy(&answer);
                    let text = text.trim();
                    let value = text.parse().map_err(|_| {
                        format!(
                            "GET {url} answered {:?}, not a number; set json_path to where the number is",
                            &text[..text.len().min(80)]
                        )
                    })?;
                    finite(value)
                }
                path => {
                    let document: Value = serde_json::from_slice(&answer)
                        .map_err(|e| format!("the answer is not JSON: {e}"))?;
                    number_at(&document, path)
                }
            }
        }
        Provider::Proxy => unreachable!("the proxy provider is measured from heartbeats"),
    }
}

/// The one value of an instant query's answer: a scalar, or a vector of
/// exactly one series.
fn prometheus_value(answer: &[u8]) -> Result<f64, String> {
    let document: Value =
        serde_json::from_slice(answer).map_err(|e| format!("prometheus answered no JSON: {e}"))?;
    if document["status"] != "success" {
        return Err(format!(
            "prometheus refused the query: {}",
            document["error"].as_str().unwrap_or("no reason given")
        ));
    }
    let data = &document["data"];
    match data["resultType"].as_str() {
        Some("scalar") => number_at(data, "result[1]"),
        Some("vector") => match data["result"].as_array().map(Vec::len) {
            Some(1) => number_at(data, "result[0].value[1]"),
            Some(0) => Err("the query returned no series (no data yet?)".into()),
            n => Err(format!(
                "the query returned {} series; aggregate it to one (e.g. sum(...))",
                n.unwrap_or(0)
            )),
        },
        other => Err(format!(
            "the query returned a {}; use one that returns a scalar or one series",
            other.unwrap_or("nothing")
        )),
    }
}

type HttpsClient = Client<cutover_common::fetch::HttpsConnector, Empty<Bytes>>;

/// One client for every measurement of every rollout: its connections
/// (and TLS sessions) to a Prometheus or an endpoint asked every few
/// seconds are reused, not set up per sample.
fn client() -> &'static HttpsClient {
    static CLIENT: std::sync::OnceLock<HttpsClient> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let connector =
            cutover_common::fetch::https_connector(cutover_common::fetch::public_roots());
        Client::builder(TokioExecutor::new()).build(connector)
    })
}

async fn get(url: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<Vec<u8>, String> {
    let client = client();
    let mut request = hyper::Request::get(url).header(
        hyper::header::USER_AGENT,
        format!("cutover/{}", cutover_common::VERSION),
    );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| format!("cannot make the request: {e}"))?;
    let answer = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "GET {url} answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), answer)
        .await
        .map_err(|_| format!("GET {url}: no answer within {timeout_ms} ms"))?
}

/// A query string value: everything but unreserved characters escaped.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_find_numbers_and_say_what_is_missing() {
        let doc: Value =
            serde_json::from_str(r#"{"data":{"errors":3,"items":[{"v":"1.5"}]}}"#).unwrap();
        assert_eq!(number_at(&doc, "$.data.errors"), Ok(3.0));
        assert_eq!(number_at(&doc, "data.items[0].v"), Ok(1.5));
        assert!(number_at(&doc, "$.data.nope")
            .unwrap_err()
            .contains("nothing at"));
        assert!(number_at(&doc, "$.data")
            .unwrap_err()
            .contains("not a number"));
        assert!(check_json_path("$.a[x]")
            .unwrap_err()
            .contains("not an array index"));
        assert!(check_json_path("$.a[1").unwrap_err().contains("not closed"));
    }

    #[test]
    fn prometheus_answers_give_one_value_or_a_reason() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"2.5"]}]}}"#;
        assert_eq!(prometheus_value(vector), Ok(2.5));
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.1,"7"]}}"#;
        assert_eq!(prometheus_value(scalar), Ok(7.0));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(prometheus_value(empty).unwrap_err().contains("no series"));
        let bad = br#"{"status":"error","error":"parse error at char 3"}"#;
        assert!(prometheus_value(bad).unwrap_err().contains("parse error"));
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"NaN"]}]}}"#;
        assert!(prometheus_value(nan)
            .unwrap_err()
            .contains("no data to judge"));
        assert_eq!(
            percent_encode("sum(x{a=\"b\"})"),
            "sum%28x%7Ba%3D%22b%22%7D%29"
        );
    }
}
