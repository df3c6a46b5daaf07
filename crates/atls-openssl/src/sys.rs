//! FFI the `openssl` crate does not wrap: the DTLS timer callback and
//! `SSL_ctrl` commands, the early-data status, and session ticket
//! application data. The only `unsafe` code of the workspace.
#![allow(unsafe_code)]

use std::os::raw::{c_int, c_long, c_uint, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use foreign_types_shared::ForeignTypeRef;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContextBuilder, SslRef};

use crate::context::state_index;

/// `DTLS_CTRL_GET_TIMEOUT` from `<openssl/ssl.h>`.
const DTLS_CTRL_GET_TIMEOUT: c_int = 73;
/// `DTLS_CTRL_HANDLE_TIMEOUT` from `<openssl/ssl.h>`.
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

type TimerCallback = unsafe extern "C" fn(ssl: *mut openssl_sys::SSL, timer_us: c_uint) -> c_uint;

extern "C" {
    // void DTLS_set_timer_cb(SSL *s, DTLS_timer_cb cb); OpenSSL >= 1.1.1.
    fn DTLS_set_timer_cb(ssl: *mut openssl_sys::SSL, cb: Option<TimerCallback>);
    // int SSL_get_early_data_status(const SSL *s); OpenSSL >= 1.1.1.
    fn SSL_get_early_data_status(ssl: *const openssl_sys::SSL) -> c_int;
    // int SSL_CTX_set_session_ticket_cb(SSL_CTX *ctx, SSL_CTX_generate_session_ticket_fn gen_cb,
    //     SSL_CTX_decrypt_session_ticket_fn dec_cb, void *arg); OpenSSL >= 1.1.1.
    fn SSL_CTX_set_session_ticket_cb(
        ctx: *mut openssl_sys::SSL_CTX,
        gen_cb: Option<TicketGenerateCallback>,
        dec_cb: Option<unsafe extern "C" fn()>,
        arg: *mut c_void,
    ) -> c_int;
    // int SSL_SESSION_set1_ticket_appdata(SSL_SESSION *ss, const void *data, size_t len);
    fn SSL_SESSION_set1_ticket_appdata(
        ss: *mut openssl_sys::SSL_SESSION,
        data: *const c_void,
        len: usize,
    ) -> c_int;
    // int SSL_SESSION_get0_ticket_appdata(SSL_SESSION *ss, void **data, size_t *len);
    fn SSL_SESSION_get0_ticket_appdata(
        ss: *mut openssl_sys::SSL_SESSION,
        data: *mut *mut c_void,
        len: *mut usize,
    ) -> c_int;
    // int SSL_SESSION_has_ticket(const SSL_SESSION *s);
    fn SSL_SESSION_has_ticket(ss: *const openssl_sys::SSL_SESSION) -> c_int;
}

type TicketGenerateCallback = unsafe extern "C" fn(ssl: *mut openssl_sys::SSL, arg: *mut c_void) -> c_int;

/// Prefix of the ticket application data that carries a PSK identity.
const PSK_APPDATA_TAG: &[u8] = b"atls-psk:";

/// The schedule of one session's timer, kept in the SSL's ex_data.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimerSchedule {
    pub(crate) initial_us: u32,
    pub(crate) max_us: u32,
}

fn schedule_index() -> Index<Ssl, TimerSchedule> {
    static INDEX: OnceLock<Index<Ssl, TimerSchedule>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex_data index allocation"))
}

/// OpenSSL calls this when it starts (`timer_us == 0`) or doubles the timer.
unsafe extern "C" fn next_timeout(ssl: *mut openssl_sys::SSL, timer_us: c_uint) -> c_uint {
    // SAFETY: OpenSSL passes the live SSL whose timer it is handling; the
    // reference does not outlive this call.
    let ssl = unsafe { SslRef::from_ptr(ssl) };
    let schedule = ssl.ex_data(schedule_index()).copied().unwrap_or(TimerSchedule {
        initial_us: 1_000_000,
        max_us: 60_000_000,
    });
    if timer_us == 0 {
        schedule.initial_us
    } else {
        timer_us.saturating_mul(2).min(schedule.max_us)
    }
}

/// Install the caller's retransmission schedule on a DTLS SSL.
pub(crate) fn install(ssl: &mut SslRef, initial: Duration, max: Duration) {
    let to_us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(15_000);
    ssl.set_ex_data(
        schedule_index(),
        TimerSchedule {
            initial_us: to_us(initial),
            max_us: to_us(max),
        },
    );
    // SAFETY: `ssl` is a valid SSL and the callback is a plain function.
    unsafe { DTLS_set_timer_cb(ssl.as_ptr(), Some(next_timeout)) };
}

/// DTLSv1_get_timeout: the time left on the running timer.
pub(crate) fn remaining(ssl: &SslRef) -> Option<Duration> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: DTLS_CTRL_GET_TIMEOUT writes one struct timeval through parg.
    let running = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_GET_TIMEOUT,
            0,
            (&mut tv as *mut libc::timeval).cast::<c_void>(),
        )
    };
    if running != 1 {
        return None;
    }
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u32::try_from(tv.tv_usec).unwrap_or(0);
    Some(Duration::from_secs(secs) + Duration::from_micros(u64::from(micros)))
}

/// DTLSv1_handle_timeout: 1 = retransmitted, 0 = not due, -1 = fatal.
pub(crate) fn handle(ssl: &SslRef) -> c_long {
    // SAFETY: DTLS_CTRL_HANDLE_TIMEOUT takes no argument.
    unsafe { openssl_sys::SSL_ctrl(ssl.as_ptr(), DTLS_CTRL_HANDLE_TIMEOUT, 0, std::ptr::null_mut()) }
}

/// Whether 0-RTT data was accepted (SSL_EARLY_DATA_ACCEPTED == 2).
pub(crate) fn early_data_accepted(ssl: &SslRef) -> bool {
    // SAFETY: read-only query on a valid SSL.
    unsafe { SSL_get_early_data_status(ssl.as_ptr()) == 2 }
}

/// OpenSSL calls this before it encrypts a session ticket: a session
/// established with an external PSK records the PSK identity in the ticket's
/// application data (TLS 1.3 keeps no PSK identity in the session itself).
unsafe extern "C" fn generate_ticket(ssl: *mut openssl_sys::SSL, _arg: *mut c_void) -> c_int {
    // SAFETY: OpenSSL passes the live SSL whose ticket it generates; the
    // reference does not outlive this call.
    let ssl_ref = unsafe { SslRef::from_ptr(ssl) };
    let Some(identity) = ssl_ref
        .ex_data(state_index())
        .and_then(|s| s.psk_identity.as_deref())
    else {
        // A resumed session keeps the data its ticket brought (OpenSSL copies
        // it into the new session).
        return 1;
    };
    let mut data = Vec::with_capacity(PSK_APPDATA_TAG.len() + identity.len());
    data.extend_from_slice(PSK_APPDATA_TAG);
    data.extend_from_slice(identity);
    // SAFETY: SSL_get_session returns the SSL's current session (or NULL);
    // set1 copies `data`, which lives until the call returns.
    unsafe {
        let session = openssl_sys::SSL_get_session(ssl);
        if session.is_null() {
            return 1;
        }
        SSL_SESSION_set1_ticket_appdata(session, data.as_ptr().cast::<c_void>(), data.len())
    }
}

/// Record the PSK identity of external-PSK sessions in their tickets.
pub(crate) fn install_ticket_psk_identity(builder: &mut SslContextBuilder) -> bool {
    // SAFETY: `builder` holds a valid SSL_CTX; the callback is a plain function
    // and there is no argument to keep alive.
    unsafe {
        SSL_CTX_set_session_ticket_cb(
            builder.as_ptr(),
            Some(generate_ticket),
            None,
            std::ptr::null_mut(),
        ) == 1
    }
}

/// The PSK identity a resumed session's ticket carried, if any.
pub(crate) fn ticket_psk_identity(ssl: &SslRef) -> Option<Vec<u8>> {
    let mut data: *mut c_void = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: get0 returns a pointer into the session, which the SSL keeps
    // alive while `ssl` is borrowed; the bytes are copied out at once.
    let bytes = unsafe {
        let session = openssl_sys::SSL_get_session(ssl.as_ptr());
        if session.is_null()
            || SSL_SESSION_get0_ticket_appdata(session, &mut data, &mut len) != 1
            || data.is_null()
        {
            return None;
        }
        std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec()
    };
    bytes.strip_prefix(PSK_APPDATA_TAG).map(<[u8]>::to_vec)
}

/// Whether the SSL's current session carries a session ticket.
pub(crate) fn session_has_ticket(ssl: &SslRef) -> bool {
    // SAFETY: read-only query on the SSL's current session (checked for NULL).
    unsafe {
        let session = openssl_sys::SSL_get_session(ssl.as_ptr());
        !session.is_null() && SSL_SESSION_has_ticket(session) == 1
    }
}
