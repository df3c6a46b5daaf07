//! One request in each protection mode: `cargo run -p atls-examples
//! --example client_modes [URL] [CA_FILE]` (defaults: the `axum_service`
//! example's address and CA).

use atls_core::{Certificate, ClientConfig, Engine};
use atls_http::{AtlsClient, ClientOptions, Mode};
use bytes::Bytes;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let ca = args.next().unwrap_or_else(|| "example-ca.pem".into());
    let trust_anchors = Certificate::all_from_pem(&std::fs::read(&ca)?)?;
    for mode in Mode::ALL {
        // The same ATLS configuration whichever the mode; a session per client.
        let endpoint = atls_openssl::OpenSslEngine.client(&ClientConfig {
            trust_anchors: trust_anchors.clone(),
            ..ClientConfig::default()
        })?;
        let client = AtlsClient::new(
            &url,
            endpoint,
            ClientOptions {
                mode,
                server_name: Some("localhost".into()),
                ..ClientOptions::default()
            },
        )?;
        let response = client
            .send(http::Request::get("/hello").body(Bytes::new())?)
            .await?;
        print!(
            "{mode}: {} {}",
            response.status(),
            String::from_utf8_lossy(response.body())
        );
        client.close().await;
    }
    Ok(())
}
