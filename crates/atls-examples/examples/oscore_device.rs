//! A device's loop, sans IO: the ATLS handshake as opaque flights (here
//! handed straight to an in-memory server; a device would POST them over
//! CoAP or HTTP), the §9.1 export, then OSCORE requests and responses
//! protected with the exported context. `cargo run -p atls-examples
//! --example oscore_device`.

use std::time::Instant;

use atls_core::{
    ClientConfig, ClientSessionParams, Engine, ProtectionKind, ServerConfig, ServerSessionParams, Session,
};
use atls_oscore::{ContextParams, SecurityContext};
use coap_lite::{CoapOption, MessageClass, Packet, RequestType, ResponseType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = atls_pki::DevCa::new("example CA")?;
    let server_endpoint = atls_rustls::RustlsEngine.server(&ServerConfig {
        identity: Some(ca.issue_server(&["service.example"])?.certified_key()),
        ..ServerConfig::default()
    })?;
    let device_endpoint = atls_openssl::OpenSslEngine.client(&ClientConfig {
        trust_anchors: vec![ca.certificate().clone()],
        ..ClientConfig::default()
    })?;
    let mut device = Session::client(
        &*device_endpoint,
        &ClientSessionParams {
            server_name: Some("service.example".into()),
            ..ClientSessionParams::default()
        },
    )?;
    let mut service = Session::server(&*server_endpoint, &ServerSessionParams::default())?;

    // Flights until both sides are done: each is one payload on the wire.
    let now = Instant::now();
    while !(device.is_handshake_complete() && service.is_handshake_complete()) {
        let mut moved = false;
        if let Some(flight) = device.take_flight(now)? {
            println!("device → service: {} B", flight.len());
            service.push_flight(&flight, now)?;
            moved = true;
        }
        if let Some(flight) = service.take_flight(now)? {
            println!("service → device: {} B", flight.len());
            device.push_flight(&flight, now)?;
            moved = true;
        }
        if !moved {
            return Err("the handshake stalled".into());
        }
    }

    // The §9.1 export keys an OSCORE context on each side.
    let context = |s: &Session| -> Result<SecurityContext, Box<dyn std::error::Error>> {
        let keys = s.atls_keys(ProtectionKind::Oscore)?;
        let ids = s.protection_ids(ProtectionKind::Oscore)?;
        Ok(SecurityContext::new_in_memory(&ContextParams::from_atls(
            &keys, &ids,
        ))?)
    };
    let (mut device_ctx, mut service_ctx) = (context(&device)?, context(&service)?);

    for reading in ["21.5", "21.7"] {
        let mut request = Packet::new();
        request.header.code = MessageClass::Request(RequestType::Post);
        request.add_option(CoapOption::UriPath, b"temperature".to_vec());
        request.payload = reading.as_bytes().to_vec();
        let (protected, binding) = atls_oscore::protect_request(&mut device_ctx, &request)?;
        println!(
            "device sends {} B of OSCORE (path and payload encrypted)",
            protected.payload.len()
        );

        let (inner, service_binding) = atls_oscore::unprotect_request(&mut service_ctx, &protected)?;
        println!(
            "service reads POST /temperature {}",
            String::from_utf8_lossy(&inner.payload)
        );
        let mut answer = Packet::new();
        answer.header.code = MessageClass::Response(ResponseType::Changed);
        let protected = atls_oscore::protect_response(&mut service_ctx, &answer, &service_binding, false)?;
        let inner = atls_oscore::unprotect_response(&mut device_ctx, &protected, &binding)?;
        println!("device reads {}", inner.header.code);
    }
    Ok(())
}
