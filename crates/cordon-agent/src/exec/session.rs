//! One command session: the process, its two output buffers, the clients attached to it, and
//! its lifecycle (timeout, idle timeout, kill on disconnect, TTL) per spec §3.3.8.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cordon_api::exec::{ExecuteRequest, Stream, MAX_CHUNK_BYTES};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::buffer::{OutputBuffer, TextChunk};
use super::fd::CommandFd;
use super::spawn::Spawned;
use crate::reaper::ExitCode;

/// How long output may keep flowing after the process exited, when background children hold
/// its pipes open. Time spent waiting for a slow client does not count.
const EXIT_GRACE: Duration = Duration::from_millis(200);
/// Pipe buffer asked for on stdout (the Linux default is 64 KiB).
const PIPE_BYTES: i32 = 1 << 20;
/// Largest single read from a command's pipe: fewer wake-ups on fast output.
const PUMP_READ_BYTES: usize = 256 * 1024;
/// First read buffer of a pump; it grows to [`PUMP_READ_BYTES`] once a read fills it. Most
/// commands print little, and a large buffer per stream per command costs page faults and
/// allocator trimming (`madvise`) on every command.
const PUMP_FIRST_READ_BYTES: usize = 16 * 1024;
/// How long output an SSE client was asked to acknowledge stays protected while it comes back
/// to resume (its retry backoff is at most 8 s, five times).
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Most acknowledgements awaited at once per session; the oldest is dropped beyond it.
const MAX_PARKED: usize = 8;

/// How a finished command ended, as clients are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exited(ExitCode),
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    Client,
    Timeout,
    Idle,
    Disconnect,
}

/// The lifecycle settings of one command (spec §3.3.3), already normalised.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// Wall-clock limit; `None` = none.
    pub timeout: Option<Duration>,
    /// Kill after this long with no client attached; `None` = never.
    pub idle_timeout: Option<Duration>,
    pub kill_on_disconnect: bool,
    /// Keep the finished session this long; `None` = forever.
    pub ttl: Option<Duration>,
}

/// Longest any client-given duration is taken to be (about 30 years): keeps `Instant` math
/// from overflowing.
const MAX_SECONDS: i64 = 1 << 30;

fn seconds(value: i64) -> Duration {
    Duration::from_secs(value.clamp(0, MAX_SECONDS) as u64)
}

impl Lifecycle {
    pub fn from_request(request: &ExecuteRequest) -> Self {
        Lifecycle {
            timeout: (request.timeout_seconds > 0).then(|| seconds(request.timeout_seconds)),
            // 0 is treated like -1: "kill as soon as nobody is attached" is what
            // kill_on_disconnect is for.
            idle_timeout: (request.idle_timeout_seconds > 0)
                .then(|| seconds(request.idle_timeout_seconds)),
            kill_on_disconnect: request.kill_on_disconnect,
            ttl: (request.ttl_seconds >= 0).then(|| seconds(request.ttl_seconds)),
        }
    }
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

struct State {
    output: [OutputBuffer; 2],
    /// A pump is waiting because attached clients still need every byte it would evict.
    pump_blocked: [bool; 2],
    /// Per attached client, the lowest offset of each stream it still needs.
    pins: HashMap<u64, [u64; 2]>,
    /// Offsets SSE clients were told to resume from (`ack_required`), kept until they resume:
    /// between the two requests nobody is attached, and evicting then would lose their bytes.
    parked: Vec<([u64; 2], Instant)>,
    next_attachment: u64,
    unattached_since: Option<Instant>,
    kill_reason: Option<KillReason>,
    process_exit: Option<(ExitCode, Instant)>,
    outcome: Option<Outcome>,
    finished_at: Option<Instant>,
}

impl State {
    fn floor(&self, stream: usize) -> u64 {
        let attached = self.pins.values().map(|pins| pins[stream]);
        let parked = self.parked.iter().map(|(pins, _)| pins[stream]);
        attached.chain(parked).min().unwrap_or(u64::MAX)
    }

    /// Forgets parked offsets that timed out; returns when the next one will.
    fn expire_parked(&mut self, now: Instant) -> Option<Instant> {
        self.parked.retain(|(_, until)| *until > now);
        self.parked.iter().map(|(_, until)| *until).min()
    }
}

/// A running or finished command.
pub struct Session {
    pub id: String,
    pub pid: i32,
    pub pty: bool,
    limits: Lifecycle,
    state: Mutex<State>,
    /// Output appended, a stream ended, a pump blocked, or the command finished.
    output_changed: watch::Sender<()>,
    /// A client moved its pins or detached: a blocked pump may have room.
    room_changed: watch::Sender<()>,
    /// Attach, detach, kill or process exit.
    lifecycle_changed: watch::Sender<()>,
    stdin: tokio::sync::Mutex<Option<CommandFd>>,
}

fn notify(channel: &watch::Sender<()>) {
    channel.send_replace(());
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Session {
    /// Takes over a freshly spawned process and starts its pumps and supervisor. `on_expire`
    /// runs when the finished session's TTL runs out.
    pub fn start(
        id: String,
        spawned: Spawned,
        pty: bool,
        limits: Lifecycle,
        buffer_cap: u64,
        on_expire: impl FnOnce(&Arc<Session>) + Send + 'static,
    ) -> io::Result<Arc<Session>> {
        let (stdin, stdout, stderr) =
            match register_fds(spawned.stdin, spawned.stdout, spawned.stderr) {
                Ok(fds) => fds,
                Err(error) => {
                    // Nobody could ever see or stop it: do not leave it running.
                    let _ = killpg(Pid::from_raw(spawned.pid), Signal::SIGKILL);
                    return Err(error);
                }
            };
        if !pty {
            stdout.enlarge_pipe(PIPE_BYTES);
        }
        let mut output = [OutputBuffer::new(buffer_cap), OutputBuffer::new(buffer_cap)];
        if stderr.is_none() {
            output[1].mark_eof();
        }
        let session = Arc::new(Session {
            id,
            pid: spawned.pid,
            pty,
            limits,
            state: Mutex::new(State {
                output,
                pump_blocked: [false; 2],
                pins: HashMap::new(),
                parked: Vec::new(),
                next_attachment: 0,
                unattached_since: Some(Instant::now()),
                kill_reason: None,
                process_exit: None,
                outcome: None,
                finished_at: None,
            }),
            output_changed: watch::Sender::new(()),
            room_changed: watch::Sender::new(()),
            lifecycle_changed: watch::Sender::new(()),
            stdin: tokio::sync::Mutex::new(stdin),
        });
        tokio::spawn(pump(session.clone(), 0, stdout));
        if let Some(stderr) = stderr {
            tokio::spawn(pump(session.clone(), 1, stderr));
        }
        tokio::spawn(supervise(session.clone(), spawned.exit, on_expire));
        Ok(session)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The message clients get when the command's `timeout_seconds` killed it.
    pub fn timeout_message(&self) -> String {
        let seconds = self.limits.timeout.unwrap_or_default().as_secs();
        format!(
            "command {} timed out after {seconds} seconds and was killed",
            self.id
        )
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome
    }

    pub fn is_running(&self) -> bool {
        self.outcome().is_none()
    }

    /// When the session finished, if it has.
    pub fn finished_at(&self) -> Option<Instant> {
        self.lock().finished_at
    }

    /// Wakes on new output, a stream ending or the command finishing.
    pub fn subscribe_output(&self) -> watch::Receiver<()> {
        self.output_changed.subscribe()
    }

    /// Registers a client that needs each stream from the given offsets on.
    pub fn attach(self: &Arc<Self>, from: [u64; 2]) -> Attachment {
        let mut state = self.lock();
        let id = state.next_attachment;
        state.next_attachment += 1;
        let pins = [0, 1].map(|s| from[s].min(state.output[s].end()));
        state.pins.insert(id, pins);
        // Resuming from parked offsets is the acknowledgement they were waiting for.
        state
            .parked
            .retain(|(parked, _)| parked[0] > from[0] || parked[1] > from[1]);
        state.unattached_since = None;
        drop(state);
        notify(&self.lifecycle_changed);
        Attachment {
            session: self.clone(),
            id,
        }
    }

    fn detach(&self, id: u64) {
        let mut state = self.lock();
        state.pins.remove(&id);
        let last_gone = state.pins.is_empty();
        if last_gone {
            state.unattached_since = Some(Instant::now());
        }
        drop(state);
        notify(&self.room_changed);
        notify(&self.lifecycle_changed);
        if last_gone && self.limits.kill_on_disconnect {
            self.kill_with(KillReason::Disconnect);
        }
    }

    /// SIGKILLs the whole process group (a client's `kill`).
    pub fn kill(&self) {
        self.kill_with(KillReason::Client);
    }

    fn kill_with(&self, reason: KillReason) {
        let mut state = self.lock();
        // Once finished, the group is gone and its id may belong to someone else.
        if state.outcome.is_some() {
            return;
        }
        state.kill_reason.get_or_insert(reason);
        drop(state);
        tracing::debug!(command_id = %self.id, ?reason, "killing process group");
        if let Err(error) = killpg(Pid::from_raw(self.pid), Signal::SIGKILL) {
            tracing::debug!(command_id = %self.id, %error, "killpg");
        }
        notify(&self.lifecycle_changed);
    }

    /// Writes client input to stdin or the PTY; input after stdin was closed is dropped.
    pub async fn write_input(&self, data: &[u8]) {
        let stdin = self.stdin.lock().await;
        if let Some(fd) = stdin.as_ref() {
            if let Err(error) = fd.write_all(data).await {
                tracing::debug!(command_id = %self.id, %error, "stdin write failed");
            }
        }
    }

    /// Half-closes stdin so readers see EOF; a no-op for a PTY (spec §3.3.6).
    pub async fn close_input(&self) {
        if !self.pty {
            self.stdin.lock().await.take();
        }
    }

    /// The next thing a WebSocket client at `cursors` should be sent.
    pub fn next_text(&self, cursors: &mut Cursors) -> Next<TextChunk> {
        let state = self.lock();
        for step in 0..2 {
            let s = (cursors.turn + step) % 2;
            if let Some(chunk) =
                state.output[s].text_chunk(cursors.at[s], MAX_CHUNK_BYTES, cursors.realign[s])
            {
                cursors.turn = (s + 1) % 2;
                cursors.realign[s] = false;
                cursors.at[s] = chunk.next;
                return Next::Output(STREAMS[s], chunk);
            }
        }
        match state.outcome {
            Some(outcome) => Next::Finished(outcome),
            None => Next::Wait,
        }
    }

    /// The next thing an SSE client at `cursors` should be sent (spec §3.4).
    pub fn next_raw(&self, cursors: &mut Cursors, pins: [u64; 2]) -> SseNext {
        let state = self.lock();
        for step in 0..2 {
            let s = (cursors.turn + step) % 2;
            if let Some((offset, bytes)) = state.output[s].raw_chunk(cursors.at[s], MAX_CHUNK_BYTES)
            {
                cursors.turn = (s + 1) % 2;
                cursors.at[s] = offset + bytes.len() as u64;
                return SseNext::Output(STREAMS[s], offset, bytes);
            }
        }
        for (s, output) in state.output.iter().enumerate() {
            if output.is_eof() && !cursors.ended[s] {
                cursors.ended[s] = true;
                cursors.at[s] = cursors.at[s].max(output.end());
                return SseNext::StreamEnd(STREAMS[s], output.end());
            }
        }
        if let Some(outcome) = state.outcome {
            return SseNext::Finished(outcome);
        }
        // Our unacknowledged bytes are what the pump is waiting on: ask for an ack.
        if (0..2).any(|s| state.pump_blocked[s] && pins[s] < cursors.at[s]) {
            return SseNext::AckRequired(cursors.at);
        }
        SseNext::Wait
    }

    /// Everything still buffered of each stream, as text (for `POST /execute`).
    pub fn buffered_text(&self) -> [String; 2] {
        let state = self.lock();
        [state.output[0].all_text(), state.output[1].all_text()]
    }

    /// Waits until the session finished.
    pub async fn finished(&self) -> Outcome {
        let mut changes = self.subscribe_output();
        loop {
            changes.borrow_and_update();
            if let Some(outcome) = self.outcome() {
                return outcome;
            }
            if changes.changed().await.is_err() {
                return Outcome::Exited(-1);
            }
        }
    }

    /// Room the pump of `stream` has, when the process exited, and when a parked offset next
    /// times out. Marks the pump blocked when there is no room.
    fn pump_room(&self, stream: usize) -> (usize, Option<Instant>, Option<Instant>) {
        let mut state = self.lock();
        let next_expiry = state.expire_parked(Instant::now());
        let room = state.output[stream].room(state.floor(stream));
        let newly_blocked = room == 0 && !state.pump_blocked[stream];
        state.pump_blocked[stream] = room == 0;
        let exited_at = state.process_exit.map(|(_, at)| at);
        drop(state);
        if newly_blocked {
            notify(&self.output_changed);
        }
        (room, exited_at, next_expiry)
    }

    fn append(&self, stream: usize, data: &[u8]) {
        self.lock().output[stream].append(data);
        notify(&self.output_changed);
    }

    fn mark_eof(&self, stream: usize) {
        self.lock().output[stream].mark_eof();
        notify(&self.output_changed);
        notify(&self.lifecycle_changed);
    }

    fn both_streams_ended(&self) -> bool {
        self.lock().output.iter().all(OutputBuffer::is_eof)
    }

    /// Waits for the process to exit, enforcing the timeout and the idle timeout meanwhile.
    async fn wait_process_exit(&self, mut exit: oneshot::Receiver<ExitCode>) -> ExitCode {
        let started = Instant::now();
        let mut changes = self.lifecycle_changed.subscribe();
        loop {
            changes.borrow_and_update();
            let (timeout_at, idle_at) = {
                let state = self.lock();
                let killed = state.kill_reason.is_some();
                let timeout_at = self.limits.timeout.map(|limit| started + limit);
                let idle_at = self
                    .limits
                    .idle_timeout
                    .zip(state.unattached_since)
                    .map(|(idle, since)| since + idle);
                (timeout_at.filter(|_| !killed), idle_at.filter(|_| !killed))
            };
            tokio::select! {
                code = &mut exit => return code.unwrap_or(-1),
                _ = sleep_until(timeout_at) => self.kill_with(KillReason::Timeout),
                _ = sleep_until(idle_at) => self.kill_with(KillReason::Idle),
                _ = changes.changed() => {}
            }
        }
    }

    fn record_process_exit(&self, code: ExitCode) {
        self.lock().process_exit = Some((code, Instant::now()));
        notify(&self.lifecycle_changed);
    }

    fn finish(&self, code: ExitCode) {
        let mut state = self.lock();
        let outcome = match state.kill_reason {
            Some(KillReason::Timeout) => Outcome::TimedOut,
            _ => Outcome::Exited(code),
        };
        state.outcome = Some(outcome);
        state.finished_at = Some(Instant::now());
        drop(state);
        tracing::debug!(command_id = %self.id, ?outcome, "command finished");
        if let Ok(mut stdin) = self.stdin.try_lock() {
            stdin.take();
        }
        notify(&self.output_changed);
    }
}

/// Where one client is in each stream.
#[derive(Debug, Clone, Default)]
pub struct Cursors {
    pub at: [u64; 2],
    /// The offset came from the client and may sit inside a character.
    pub realign: [bool; 2],
    /// SSE: `stream_end` was sent for the stream.
    pub ended: [bool; 2],
    turn: usize,
}

impl Cursors {
    pub fn from_offsets(at: [u64; 2]) -> Self {
        Cursors {
            at,
            realign: [true; 2],
            ..Default::default()
        }
    }
}

pub enum Next<T> {
    Output(Stream, T),
    Finished(Outcome),
    Wait,
}

pub enum SseNext {
    Output(Stream, u64, Vec<u8>),
    StreamEnd(Stream, u64),
    Finished(Outcome),
    AckRequired([u64; 2]),
    Wait,
}

/// One attached client. Dropping it detaches (which may kill, with `kill_on_disconnect`).
pub struct Attachment {
    session: Arc<Session>,
    id: u64,
}

impl Attachment {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The client no longer needs bytes of `stream` below `offset`.
    pub fn release_below(&self, stream: Stream, offset: u64) {
        let s = index(stream);
        let mut state = self.session.lock();
        let blocked = state.pump_blocked[s];
        if let Some(pins) = state.pins.get_mut(&self.id) {
            pins[s] = pins[s].max(offset);
        }
        drop(state);
        if blocked {
            notify(&self.session.room_changed);
        }
    }
}

impl Attachment {
    /// Detaches, but keeps the bytes from `resume_at` on until the client resumes there or
    /// [`ACK_WAIT`] passes (SSE `ack_required`).
    pub fn detach_awaiting_ack(self, resume_at: [u64; 2]) {
        let mut state = self.session.lock();
        if state.parked.len() >= MAX_PARKED {
            state.parked.remove(0);
        }
        state.parked.push((resume_at, Instant::now() + ACK_WAIT));
        drop(state);
        // Dropping `self` detaches.
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.session.detach(self.id);
    }
}

type CommandFds = (Option<CommandFd>, CommandFd, Option<CommandFd>);

fn register_fds(
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
) -> io::Result<CommandFds> {
    let stdin = stdin
        .map(|fd| CommandFd::new(fd, Interest::WRITABLE))
        .transpose()?;
    let stdout = CommandFd::new(stdout, Interest::READABLE)?;
    let stderr = stderr
        .map(|fd| CommandFd::new(fd, Interest::READABLE))
        .transpose()?;
    Ok((stdin, stdout, stderr))
}

/// Moves one stream's bytes from the pipe into its buffer, pausing while attached clients
/// still need every byte that appending would evict.
async fn pump(session: Arc<Session>, stream: usize, fd: CommandFd) {
    let mut buf = vec![0u8; PUMP_FIRST_READ_BYTES];
    let mut room_changes = session.room_changed.subscribe();
    let mut lifecycle = session.lifecycle_changed.subscribe();
    let mut waited_after_exit = Duration::ZERO;
    loop {
        room_changes.borrow_and_update();
        lifecycle.borrow_and_update();
        let (room, exited_at, parked_expiry) = session.pump_room(stream);
        if room == 0 {
            let waiting_since = Instant::now();
            tokio::select! {
                _ = room_changes.changed() => {}
                _ = lifecycle.changed() => {}
                _ = sleep_until(parked_expiry) => {}
            }
            if exited_at.is_some() {
                waited_after_exit += waiting_since.elapsed();
            }
            continue;
        }
        let grace_end = exited_at.map(|at| at + EXIT_GRACE + waited_after_exit);
        let want = room.min(buf.len());
        tokio::select! {
            read = fd.read(&mut buf[..want]) => match read {
                Ok(0) => break,
                Ok(n) => {
                    session.append(stream, &buf[..n]);
                    if n == buf.len() && buf.len() < PUMP_READ_BYTES {
                        buf.resize(PUMP_READ_BYTES, 0);
                    }
                }
                Err(error) => {
                    tracing::debug!(command_id = %session.id, %error, "output read failed");
                    break;
                }
            },
            _ = sleep_until(grace_end) => break,
            _ = lifecycle.changed(), if exited_at.is_none() => {}
        }
    }
    session.mark_eof(stream);
}

/// Runs the lifecycle: wait for exit (enforcing timeouts), wait for the output to end, report,
/// then expire after the TTL.
async fn supervise(
    session: Arc<Session>,
    exit: oneshot::Receiver<ExitCode>,
    on_expire: impl FnOnce(&Arc<Session>),
) {
    let code = session.wait_process_exit(exit).await;
    session.record_process_exit(code);
    let mut changes = session.lifecycle_changed.subscribe();
    loop {
        changes.borrow_and_update();
        if session.both_streams_ended() {
            break;
        }
        if changes.changed().await.is_err() {
            break;
        }
    }
    session.finish(code);
    if let Some(ttl) = session.limits.ttl {
        tokio::time::sleep(ttl).await;
        on_expire(&session);
    }
}
