//! FFI the `openssl` crate does not wrap: the DTLS timer callback and
//! `SSL_ctrl` commands, and the early-data status. The only `unsafe` code of the workspace.
#![allow(unsafe_code)]

use std::os::raw::{c_int, c_long, c_uint, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use foreign_types_shared::ForeignTypeRef;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslRef};

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
}

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
