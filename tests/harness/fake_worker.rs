//! A stand-in for `baton-worker` that fails on purpose, for rollback tests. The mode is
//! the first argument (tests start it through a one-line wrapper script):
//! - `exit`: writes to stderr and exits 3 before READY;
//! - `hang`: never says READY;
//! - `report`: reports a start-up failure over NOTIFY_SOCKET, then stays alive;
//! - `stubborn`: says READY but never accepts and ignores SIGTERM (only SIGKILL ends it).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "exit" => {
            eprintln!("fake worker: cannot open /nonexistent/data: giving up");
            std::process::exit(3);
        }
        "hang" => {
            eprintln!("fake worker: waiting forever before READY");
            sleep_bounded();
        }
        "report" => {
            let path = std::env::var_os("NOTIFY_SOCKET").expect("NOTIFY_SOCKET is set by baton");
            let sock = UnixDatagram::unbound().expect("datagram socket");
            sock.send_to(
                b"STATUS=failed: fake worker: database unreachable\nERRNO=5",
                path,
            )
            .expect("send failure report");
            sleep_bounded();
        }
        "stubborn" => {
            // SAFETY: setting a signal's disposition to SIG_IGN before any thread exists.
            #[allow(unsafe_code)]
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
            }
            let path = std::env::var_os("NOTIFY_SOCKET").expect("NOTIFY_SOCKET is set by baton");
            let sock = UnixDatagram::unbound().expect("datagram socket");
            sock.send_to(b"READY=1", path).expect("send READY");
            sleep_bounded();
        }
        other => {
            eprintln!("fake worker: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}

/// Sleeps long enough for any test, but not forever if something forgets to kill us.
fn sleep_bounded() {
    std::thread::sleep(Duration::from_secs(300));
}
