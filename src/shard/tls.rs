//! User-space TLS on a shard's connection, and the move to kernel TLS.
//!
//! After STARTTLS the connection receives ciphertext into its own buffer (`cin`), feeds it to
//! the [`TlsSession`], and reads the decrypted bytes into the ordinary receive buffer, where
//! the handshake and request parsing run unchanged. Replies are assembled into a plaintext
//! [`SendBatch`] exactly as for plaintext connections, drained into the session, and the
//! ciphertext is sent from `cout`. Every buffer comes from the shard's pool and is bounded;
//! the session's own buffers are bounded by the TLS layer.
//!
//! # Ordering
//!
//! The STARTTLS ACK must leave in plaintext and nothing after it may: the handshake queues
//! [`Out::StartTls`] right after the ACK, and the link becomes `active` (encrypting) only when
//! the send path reaches that marker. Ciphertext is never sent while the plaintext batch is
//! in flight.
//!
//! # Kernel TLS
//!
//! When the handshake completes on TCP and `tls_kernel = auto`, the session moves into the
//! kernel once nothing is in flight or buffered ([`TlsSession::into_kernel`]); the link is
//! then dropped and the connection runs the plaintext path (io_uring sends and receives
//! plaintext, the kernel encrypts). Receives are held while a switch waits for the last
//! handshake bytes to be sent. A declined switch keeps user-space TLS.

use super::{Ctx, Out, RECV_BUFFER_BYTES, Shard, Socket, Step};
use crate::config::KernelTls;
use crate::ring::{Buf, BufPool, SendBatch};
use crate::tls::{IntoKernelError, TlsError, TlsSession};

/// Ciphertext received and not yet decrypted, per connection (bytes).
const CIPHER_IN_BYTES: usize = RECV_BUFFER_BYTES;
/// Ciphertext handed to one send, per connection (bytes).
const CIPHER_OUT_BYTES: usize = 128 * 1024;

/// One connection's user-space TLS state and buffers.
#[derive(Debug)]
pub(super) struct TlsLink {
    session: TlsSession,
    /// Received ciphertext: `cin[cin_start..cin_end]` is not yet fed. `None` while a receive
    /// into it is in flight.
    cin: Option<Buf>,
    cin_start: usize,
    cin_end: usize,
    /// Ciphertext to send; travels inside `csend` while a send is in flight.
    cout: Option<Buf>,
    /// The batch that sends `cout`; `None` while in flight.
    csend: Option<Box<SendBatch>>,
    /// Replies taken from the output queue, being encrypted.
    plain: Box<SendBatch>,
    /// Replies in `plain`.
    plain_replies: usize,
    /// The STARTTLS ACK has left: output is encrypted from now on.
    pub(super) active: bool,
    /// The handshake is done and the session waits to move into the kernel once its last
    /// bytes are sent; receiving is held until then.
    switch_pending: bool,
    /// close_notify was queued (the connection is ending cleanly).
    close_notified: bool,
}

/// What [`Shard::tls_pump`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pump {
    /// New plaintext is in the receive buffer.
    Plaintext,
    /// Nothing new: receive more ciphertext.
    Idle,
    /// The connection was closed.
    Closed,
}

impl TlsLink {
    /// A link over `session` with its two buffers; `cin[..received]` holds ciphertext not yet
    /// fed; `active`: output is encrypted from the start.
    fn new(session: TlsSession, cin: Buf, received: usize, cout: Buf, active: bool) -> TlsLink {
        TlsLink {
            session,
            cin: Some(cin),
            cin_start: 0,
            cin_end: received,
            cout: Some(cout),
            csend: Some(Box::default()),
            plain: Box::default(),
            plain_replies: 0,
            active,
            switch_pending: false,
            close_notified: false,
        }
    }

    /// Nothing left to encrypt or send.
    pub(super) fn is_idle(&self) -> bool {
        self.plain.is_empty() && self.csend.is_some() && !self.session.wants_write()
    }

    /// A ciphertext send is in flight.
    pub(super) fn is_sending(&self) -> bool {
        self.csend.is_none()
    }

    /// Returns the link's buffers to the pool (the connection is gone, nothing in flight).
    pub(super) fn release(mut self, pool: &mut BufPool) {
        assert!(!self.is_sending(), "released a link with a send in flight");
        for buf in self.plain.take_bufs() {
            pool.check_in(buf);
        }
        for buf in [self.cin.take(), self.cout.take()].into_iter().flatten() {
            pool.check_in(buf);
        }
    }
}

impl Shard {
    /// The handshake accepted STARTTLS (its ACK is queued): set up the session and the
    /// buffers; bytes already received after the option are the client's first records.
    pub(super) fn start_tls(&mut self, key: usize) -> Step {
        let conn = &mut self.conns[key];
        let session = match conn.security.tls.as_ref().map(|context| context.session()) {
            Some(Ok(session)) => session,
            Some(Err(error)) => {
                tracing::warn!(shard = self.index, peer = %conn.peer, %error, "TLS session");
                self.close(key, "cannot start a TLS session");
                return Step::Blocked;
            }
            None => unreachable!("the handshake offers STARTTLS only with TLS credentials"),
        };
        let pool = self.ring.pool_mut();
        let (cin, cout) = match (
            pool.check_out(CIPHER_IN_BYTES),
            pool.check_out(CIPHER_OUT_BYTES),
        ) {
            (Some(cin), Some(cout)) => (cin, cout),
            (cin, cout) => {
                // One of the two may have been checked out: give it back.
                for buf in [cin, cout].into_iter().flatten() {
                    pool.check_in(buf);
                }
                tracing::warn!(shard = self.index, peer = %conn.peer, "buffer pool exhausted");
                self.close(key, "no buffers for TLS");
                return Step::Blocked;
            }
        };
        let rbuf = conn.rbuf.as_ref().expect("receive buffer present");
        let early = conn.rend - conn.rstart;
        assert!(early <= CIPHER_IN_BYTES);
        pool.copy_between(rbuf, conn.rstart, &cin, 0, early);
        conn.rstart = conn.rend;
        conn.tls = Some(Box::new(TlsLink::new(session, cin, early, cout, false)));
        conn.out.push_back(Out::StartTls);
        Step::NeedInput
    }

    /// Receives ciphertext (never straight into payload buffers: they need decrypting).
    pub(super) fn tls_post_recv(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let link = conn.tls.as_deref_mut().expect("TLS link");
        if link.switch_pending {
            return;
        }
        let cin = link.cin.take().expect("no TLS receive in flight");
        if link.cin_start == link.cin_end {
            (link.cin_start, link.cin_end) = (0, 0);
        } else if link.cin_start > 0 {
            let bytes = self.ring.pool_mut().bytes_mut(&cin);
            bytes.copy_within(link.cin_start..link.cin_end, 0);
            link.cin_end -= link.cin_start;
            link.cin_start = 0;
        }
        if link.cin_end == CIPHER_IN_BYTES {
            // The session is not taking more until its plaintext is read: parsing resumes it.
            link.cin = Some(cin);
            return;
        }
        let (at, len) = (link.cin_end, CIPHER_IN_BYTES - link.cin_end);
        conn.recv_busy = true;
        self.ring
            .recv(conn.fd, cin, at, len, false, Ctx::TlsRecv(key));
    }

    pub(super) fn tls_recv_done(&mut self, key: usize, result: i32, buf: Buf) {
        let conn = &mut self.conns[key];
        conn.recv_busy = false;
        conn.tls.as_deref_mut().expect("TLS link").cin = Some(buf);
        if self.recv_ended(key, result) {
            return;
        }
        let link = self.conns[key].tls.as_deref_mut().expect("TLS link");
        link.cin_end += result as usize;
        self.process_input(key);
    }

    /// Feeds buffered ciphertext to the session and reads plaintext into the receive buffer
    /// while either moves; sends handshake records; notices the end of the handshake.
    pub(super) fn tls_pump(&mut self, key: usize) -> Pump {
        let conn = &mut self.conns[key];
        let link = conn.tls.as_deref_mut().expect("TLS link");
        let was_handshaking = link.session.is_handshaking();
        let pool = self.ring.pool_mut();
        let rbuf = conn.rbuf.as_ref().expect("receive buffer present");
        let cin = link.cin.as_ref().expect("no TLS receive in flight");
        let rend = &mut conn.rend;
        let mut shuttle = || -> Result<bool, TlsError> {
            let mut plaintext = false;
            loop {
                let free = &mut pool.bytes_mut(rbuf)[*rend..RECV_BUFFER_BYTES];
                let read = link.session.read_plaintext(free)?;
                *rend += read;
                plaintext |= read > 0;
                let pending = &pool.bytes(cin)[link.cin_start..link.cin_end];
                let fed = link.session.feed(pending)?;
                link.cin_start += fed;
                if read == 0 && fed == 0 {
                    return Ok(plaintext);
                }
            }
        };
        let plaintext = match shuttle() {
            Ok(plaintext) => plaintext,
            Err(error) => {
                tracing::info!(shard = self.index, peer = %conn.peer, %error, "TLS error");
                self.close(key, "TLS error");
                return Pump::Closed;
            }
        };
        let established = was_handshaking && !link.session.is_handshaking();
        let peer_closed = link.session.peer_closed();
        if link.session.wants_write() {
            self.kick_send(key);
        }
        if established {
            self.tls_established(key);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return Pump::Closed;
        };
        if conn.closing {
            return Pump::Closed;
        }
        if peer_closed && !plaintext {
            // close_notify: no more requests will come.
            conn.stop_reading = true;
            conn.close_when_idle = true;
            self.maybe_finish(key);
            return Pump::Closed;
        }
        if plaintext {
            Pump::Plaintext
        } else {
            Pump::Idle
        }
    }

    /// Encrypts queued output and sends the ciphertext (one send in flight at a time).
    pub(super) fn tls_send(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Some(link) = conn.tls.as_deref_mut() else {
            return;
        };
        if conn.closing || !link.active || conn.batch.is_none() || link.is_sending() {
            return;
        }
        let pool = self.ring.pool_mut();
        loop {
            if link.plain.is_empty() {
                let filled = super::fill_batch(&mut conn.out, &mut link.plain);
                assert!(!filled.start_tls, "one STARTTLS per connection");
                link.plain_replies = filled.replies;
                if link.plain.is_empty() {
                    break;
                }
            }
            let session = &mut link.session;
            match link
                .plain
                .drain_into(pool, |bytes| session.write_plaintext(bytes))
            {
                Ok(true) => {
                    for buf in link.plain.take_bufs() {
                        pool.check_in(buf);
                    }
                    conn.unsent -= link.plain_replies;
                    link.plain_replies = 0;
                }
                Ok(false) => break,
                Err(error) => {
                    tracing::info!(shard = self.index, peer = %conn.peer, %error, "TLS error");
                    self.close(key, "TLS error");
                    return;
                }
            }
        }
        let cout = link.cout.take().expect("no TLS send in flight");
        let bytes = link.session.write_ciphertext(pool.bytes_mut(&cout));
        if bytes == 0 {
            link.cout = Some(cout);
            return;
        }
        let mut csend = link.csend.take().expect("no TLS send in flight");
        csend.push_buf(cout, 0, bytes);
        self.ring.send_batch(conn.fd, csend, Ctx::TlsSend(key));
    }

    pub(super) fn tls_send_done(&mut self, key: usize, result: i32, mut batch: Box<SendBatch>) {
        let complete = result >= 0 && batch.is_complete();
        let conn = &mut self.conns[key];
        let link = conn.tls.as_deref_mut().expect("TLS link");
        let mut bufs = batch.take_bufs();
        link.cout = Some(bufs.next().expect("the ciphertext buffer"));
        assert!(bufs.next().is_none(), "one buffer per ciphertext send");
        drop(bufs);
        link.csend = Some(batch);
        let to_kernel = link.switch_pending && !link.session.wants_write();
        self.after_send(key, complete, to_kernel);
    }

    /// A connection ending cleanly (NBD_CMD_DISC, ABORT) shuts TLS down first, as the spec
    /// asks: queues close_notify and returns true while it is being sent.
    pub(super) fn tls_close_notify(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        let Some(link) = conn.tls.as_deref_mut() else {
            return false;
        };
        if conn.closing || !link.active || link.close_notified {
            return false;
        }
        link.close_notified = true;
        link.session.send_close_notify();
        self.tls_send(key);
        // Only wait if the alert is on its way (its completion calls maybe_finish again).
        self.conns[key]
            .tls
            .as_ref()
            .is_some_and(|link| link.is_sending())
    }

    /// The TLS handshake completed: remember who the client is, and try kernel TLS.
    fn tls_established(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let link = conn.tls.as_deref_mut().expect("TLS link");
        conn.identity = link.session.identity().cloned();
        conn.encrypted = true;
        tracing::info!(shard = self.index, peer = %conn.peer,
            tls = %link.session.summary(), "TLS established");
        let tcp = matches!(conn.socket, Socket::Tcp(_));
        if conn.security.kernel != KernelTls::Auto || !tcp || !link.session.ready_for_kernel() {
            return;
        }
        if link.session.wants_write() || link.is_sending() {
            // TLS 1.2: the server's Finished is still to be sent; hold receives until then.
            link.switch_pending = true;
            return;
        }
        self.tls_to_kernel(key);
    }

    /// Moves the session into the kernel if nothing is buffered or in flight.
    pub(super) fn tls_to_kernel(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let link = conn.tls.as_deref_mut().expect("TLS link");
        link.switch_pending = false;
        let quiet = !conn.recv_busy
            && conn.batch.is_some()
            && link.is_idle()
            && link.cin_start == link.cin_end
            && conn.rend < RECV_BUFFER_BYTES;
        if !quiet {
            tracing::debug!(shard = self.index, peer = %conn.peer,
                "kernel TLS skipped: data buffered or in flight");
            return;
        }
        // Quiet: no receive or send in flight, so both buffers are home and `plain` is empty.
        let TlsLink {
            session, cin, cout, ..
        } = *conn.tls.take().expect("TLS link");
        let (cin, cout) = (cin.expect("no TLS receive"), cout.expect("no TLS send"));
        let pool = self.ring.pool_mut();
        match session.into_kernel(conn.fd) {
            Ok(kernel) => {
                pool.check_in(cin);
                pool.check_in(cout);
                let rbuf = conn.rbuf.as_ref().expect("receive buffer present");
                let leftover = &kernel.leftover_plaintext;
                let room = RECV_BUFFER_BYTES - conn.rend;
                if leftover.len() > room {
                    self.close(key, "kernel TLS: too much buffered plaintext");
                    return;
                }
                pool.bytes_mut(rbuf)[conn.rend..conn.rend + leftover.len()]
                    .copy_from_slice(leftover);
                conn.rend += leftover.len();
                tracing::info!(shard = self.index, peer = %conn.peer,
                    tls = %kernel.summary, "kernel TLS on");
            }
            Err(IntoKernelError::Declined { session, reason }) => {
                tracing::debug!(shard = self.index, peer = %conn.peer, %reason,
                    "kernel TLS declined; staying in user space");
                conn.tls = Some(Box::new(TlsLink::new(*session, cin, 0, cout, true)));
            }
            Err(IntoKernelError::Failed(error)) => {
                pool.check_in(cin);
                pool.check_in(cout);
                tracing::warn!(shard = self.index, peer = %conn.peer, %error, "kernel TLS");
                self.close(key, "kernel TLS setup failed");
            }
        }
    }
}
