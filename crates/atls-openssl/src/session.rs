//! One OpenSSL session over in-memory buffers.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};

use atls_core::engine::{HandshakeInfo, PeerIdentity, TlsSession};
use atls_core::{Alert, Certificate, CipherSuite, CommonConfig, Error, Framing, TlsVersion};
use openssl::ssl::{ErrorCode, NameType, ShutdownState, Ssl, SslRef, SslStream, SslVersion};
use openssl::x509::X509VerifyResult;

use crate::context::state_index;
use crate::sys;

/// Largest chunk handed to one DTLS record.
const DTLS_WRITE_CHUNK: usize = 1024;
/// Read buffer for decrypted data.
const READ_CHUNK: usize = 16 * 1024;

/// The socket OpenSSL sees: a queue of received chunks (stream bytes or
/// datagrams) and a buffer of everything written.
#[derive(Debug)]
pub(crate) struct MemoryTransport {
    datagrams: bool,
    input: VecDeque<Vec<u8>>,
    front_offset: usize,
    output: Vec<u8>,
}

impl Read for MemoryTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.datagrams {
            let datagram = self.input.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            let n = datagram.len().min(buf.len());
            buf[..n].copy_from_slice(&datagram[..n]);
            return Ok(n);
        }
        let mut copied = 0;
        while copied < buf.len() {
            let Some(front) = self.input.front() else { break };
            let available = &front[self.front_offset..];
            let n = available.len().min(buf.len() - copied);
            buf[copied..copied + n].copy_from_slice(&available[..n]);
            copied += n;
            self.front_offset += n;
            if self.front_offset == front.len() {
                self.input.pop_front();
                self.front_offset = 0;
            }
        }
        if copied == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(copied)
    }
}

impl Write for MemoryTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS/DTLS session of the OpenSSL engine.
pub(crate) struct OpenSslSession {
    stream: SslStream<MemoryTransport>,
    framing: Framing,
    is_client: bool,
    handshaking: bool,
    /// Server: SSL_read_early_data must run until it reports FINISH.
    reading_early_data: bool,
    early_in: Vec<u8>,
    app_in: Vec<u8>,
    max_buffered: usize,
    peer_closed: bool,
    /// Whether the completed handshake resumed a ticket or session (not an
    /// external PSK), decided when it completed.
    resumed: bool,
}

impl fmt::Debug for OpenSslSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSslSession")
            .field("framing", &self.framing)
            .field("is_client", &self.is_client)
            .field("handshaking", &self.handshaking)
            .finish_non_exhaustive()
    }
}

fn would_block(e: &openssl::ssl::Error) -> bool {
    matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE)
}

/// Map an OpenSSL failure onto the engine-neutral error.
fn map_error(ssl: &SslRef, e: &openssl::ssl::Error) -> Error {
    if let Some(stack) = e.ssl_error() {
        for err in stack.errors() {
            // SSL_AD_REASON_OFFSET: reasons 1000 + n mean "received alert n".
            let reason = err.reason_code();
            if (1000..1256).contains(&reason) {
                return Error::AlertReceived(Alert(u8::try_from(reason - 1000).unwrap_or(u8::MAX)));
            }
        }
        let verify = ssl.verify_result();
        if verify != X509VerifyResult::OK {
            let presented = ssl
                .ex_data(crate::context::state_index())
                .and_then(|s| s.presented_names.lock().ok().and_then(|n| n.clone()));
            if let (62, Some(names)) = (verify.as_raw(), presented) {
                let wanted = ssl
                    .ex_data(crate::context::state_index())
                    .and_then(|s| s.server_name.clone())
                    .unwrap_or_else(|| "the server name".into());
                return Error::Verification(format!(
                    "the certificate does not name {wanted} (it names {})",
                    names.join(", ")
                ));
            }
            return Error::Verification(verify.error_string().to_owned());
        }
        let reasons: Vec<_> = stack.errors().iter().filter_map(|e| e.reason()).collect();
        if reasons.is_empty() {
            return Error::Protocol(stack.to_string());
        }
        return Error::Protocol(reasons.join("; "));
    }
    if let Some(io) = e.io_error() {
        return Error::Engine(format!("transport: {io}"));
    }
    Error::Protocol(e.to_string())
}

impl OpenSslSession {
    pub(crate) fn boxed(
        mut ssl: Ssl,
        common: &CommonConfig,
        is_client: bool,
        early_data: bool,
    ) -> Result<Box<dyn TlsSession>, Error> {
        let framing = common.framing()?;
        if framing == Framing::Dtls {
            ssl.set_mtu(u32::from(common.dtls.mtu))
                .map_err(|e| Error::Config(format!("DTLS MTU: {e}")))?;
            sys::install(&mut ssl, common.dtls.initial_timeout, common.dtls.max_timeout);
        }
        let transport = MemoryTransport {
            datagrams: framing == Framing::Dtls,
            input: VecDeque::new(),
            front_offset: 0,
            output: Vec::new(),
        };
        let stream = SslStream::new(ssl, transport).map_err(|e| Error::Engine(e.to_string()))?;
        Ok(Box::new(Self {
            stream,
            framing,
            is_client,
            handshaking: true,
            reading_early_data: !is_client && early_data && framing == Framing::Tls,
            early_in: Vec::new(),
            app_in: Vec::new(),
            max_buffered: common.limits.max_buffered_application_data,
            peer_closed: false,
            resumed: false,
        }))
    }

    fn fail(&self, e: &openssl::ssl::Error) -> Error {
        map_error(self.stream.ssl(), e)
    }

    fn pump_early_data(&mut self) -> Result<(), Error> {
        let mut buf = vec![0u8; READ_CHUNK];
        while self.reading_early_data {
            match self.stream.read_early_data(&mut buf) {
                Ok(0) => self.reading_early_data = false,
                Ok(n) => {
                    if self.early_in.len() + n > self.max_buffered {
                        return Err(Error::Protocol("too much early data".into()));
                    }
                    self.early_in.extend_from_slice(&buf[..n]);
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(self.fail(&e)),
            }
        }
        Ok(())
    }

    fn pump_application_data(&mut self) -> Result<(), Error> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match self.stream.ssl_read(&mut buf) {
                // Bounded by the records pushed, which `Session` bounds
                // (flight length, buffered application data) by its own,
                // per-session limits.
                Ok(n) => self.app_in.extend_from_slice(&buf[..n]),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    self.peer_closed = true;
                    return Ok(());
                }
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(self.fail(&e)),
            }
        }
    }

    fn version(&self) -> Option<TlsVersion> {
        let v = self.stream.ssl().version2()?;
        if v == SslVersion::TLS1_3 {
            Some(TlsVersion::Tls13)
        } else if v == SslVersion::TLS1_2 {
            Some(TlsVersion::Tls12)
        } else if v == SslVersion::DTLS1_2 {
            Some(TlsVersion::Dtls12)
        } else {
            None
        }
    }

    /// SSL_session_reused is also true when a TLS 1.3 handshake used an
    /// external PSK: only a resumed session or ticket counts. Called when the
    /// handshake completes, before TLS 1.3 tickets replace the client's session.
    fn session_resumed(&self) -> bool {
        let ssl = self.stream.ssl();
        if !ssl.session_reused() {
            return false;
        }
        if self.is_client {
            // The session of an external PSK never carries a ticket; a TLS 1.2
            // session may be resumed by its ID, and TLS 1.2 PSKs never set reuse.
            ssl.version2() != Some(SslVersion::TLS1_3) || sys::session_has_ticket(ssl)
        } else {
            // The server's PSK callback supplies a key only for an external PSK.
            ssl.ex_data(state_index())
                .is_none_or(|s| s.psk_identity.is_none())
        }
    }

    fn peer_identity(&self) -> PeerIdentity {
        let ssl = self.stream.ssl();
        let mut chain = Vec::new();
        if !self.is_client {
            // On a server the peer chain excludes the leaf.
            if let Some(leaf) = ssl.peer_certificate() {
                chain.extend(leaf.to_der().ok().map(Certificate));
            }
        }
        if let Some(stack) = ssl.peer_cert_chain() {
            chain.extend(stack.iter().filter_map(|c| c.to_der().ok()).map(Certificate));
        }
        if !chain.is_empty() {
            return PeerIdentity::Certificates(chain);
        }
        // The PSK callback runs in a full handshake only: a resumed session
        // takes the identity from the session (TLS 1.2) or its ticket (TLS 1.3).
        let identity = ssl
            .ex_data(state_index())
            .and_then(|s| s.psk_identity.clone())
            .or_else(|| ssl.psk_identity().map(<[u8]>::to_vec))
            .or_else(|| sys::ticket_psk_identity(ssl));
        match identity {
            Some(identity) => PeerIdentity::Psk(identity),
            None => PeerIdentity::Anonymous,
        }
    }
}

impl Drop for OpenSslSession {
    fn drop(&mut self) {
        // SSL_free on a session that never exchanged close_notify removes its
        // SSL_SESSION from the context cache and marks it not resumable. ATLS
        // sessions usually end by expiry, not close_notify, and that must not
        // throw away their tickets: record the shutdown as done.
        if !self.handshaking {
            self.stream
                .set_shutdown(ShutdownState::SENT | ShutdownState::RECEIVED);
        }
    }
}

impl TlsSession for OpenSslSession {
    fn framing(&self) -> Framing {
        self.framing
    }

    fn push_received(&mut self, bytes: &[u8]) {
        self.stream.get_mut().input.push_back(bytes.to_vec());
    }

    fn process(&mut self) -> Result<(), Error> {
        if self.handshaking {
            if self.reading_early_data {
                self.pump_early_data()?;
            }
            if !self.reading_early_data {
                match self.stream.do_handshake() {
                    Ok(()) => {
                        self.handshaking = false;
                        self.resumed = self.session_resumed();
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                        self.peer_closed = true;
                        return Err(Error::Closed);
                    }
                    Err(e) => return Err(self.fail(&e)),
                }
            }
        }
        if !self.handshaking {
            self.pump_application_data()?;
        }
        Ok(())
    }

    fn take_output(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.stream.get_mut().output);
    }

    fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    fn write_application_data(&mut self, data: &[u8]) -> Result<(), Error> {
        let chunk = match self.framing {
            Framing::Tls => READ_CHUNK,
            Framing::Dtls => DTLS_WRITE_CHUNK,
        };
        for piece in data.chunks(chunk) {
            let mut written = 0;
            while written < piece.len() {
                match self.stream.ssl_write(&piece[written..]) {
                    Ok(n) => written += n,
                    Err(e) => return Err(self.fail(&e)),
                }
            }
        }
        Ok(())
    }

    fn read_application_data(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        out.append(&mut self.app_in);
        Ok(())
    }

    fn write_early_data(&mut self, data: &[u8]) -> Result<usize, Error> {
        if !self.is_client {
            return Err(Error::Protocol("only a client writes early data".into()));
        }
        let allowed = self.stream.ssl().session().map_or(0, |s| s.max_early_data());
        if allowed == 0 || data.is_empty() {
            return Ok(0);
        }
        let limit = data.len().min(usize::try_from(allowed).unwrap_or(usize::MAX));
        match self.stream.write_early_data(&data[..limit]) {
            Ok(n) => Ok(n),
            Err(e) if would_block(&e) => Ok(0),
            Err(e) => Err(self.fail(&e)),
        }
    }

    fn read_early_data(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.early_in);
    }

    fn export_keying_material(
        &self,
        label: &[u8],
        context: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<(), Error> {
        let label = std::str::from_utf8(label).map_err(|_| Error::Export("label is not UTF-8".into()))?;
        self.stream
            .ssl()
            .export_keying_material(out, label, context)
            .map_err(|e| Error::Export(e.to_string()))
    }

    fn handshake_info(&self) -> Option<HandshakeInfo> {
        if self.handshaking {
            return None;
        }
        let ssl = self.stream.ssl();
        let cipher = ssl.current_cipher()?.protocol_id();
        let state = ssl.ex_data(state_index())?;
        let server_name = if self.is_client {
            state.server_name.clone()
        } else {
            ssl.servername(NameType::HOST_NAME).map(str::to_owned)
        };
        let mut oscore = state.oscore.clone();
        let mut cose = state.cose.clone();
        if !self.is_client {
            // A server only answers an extension the client offered.
            if oscore.peer.is_none() {
                oscore.own = None;
            }
            if cose.peer.is_none() {
                cose.own = None;
            }
        }
        Some(HandshakeInfo {
            version: self.version()?,
            cipher_suite: CipherSuite(u16::from_be_bytes(cipher)),
            peer: self.peer_identity(),
            server_name,
            oscore_cids: oscore,
            cose_cids: cose,
            resumed: self.resumed,
            early_data_accepted: sys::early_data_accepted(ssl),
        })
    }

    fn send_close_notify(&mut self) {
        // A memory transport never blocks; a failure here leaves nothing to send.
        let _ = self.stream.shutdown();
    }

    fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    fn retransmission_timeout(&self) -> Option<std::time::Duration> {
        if self.framing != Framing::Dtls || !self.handshaking {
            return None;
        }
        sys::remaining(self.stream.ssl())
    }

    fn handle_retransmission_timeout(&mut self) -> Result<(), Error> {
        if self.framing != Framing::Dtls {
            return Ok(());
        }
        if sys::handle(self.stream.ssl()) < 0 {
            return Err(Error::HandshakeTimeout);
        }
        Ok(())
    }
}
