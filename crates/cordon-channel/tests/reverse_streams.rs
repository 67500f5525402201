//! Streams the agent opens to the host: carried both ways beside host-opened streams, refused
//! by a host that accepts none, and bounded in number against a hostile agent that ignores its
//! own opener's limit (a raw yamux peer).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cordon_channel::{
    serve, serve_with_opener, AgentClient, ChannelStream, HostOpener, MAX_INBOUND_STREAMS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// Echoes every stream back until the other end closes it.
fn echo(stream: ChannelStream) {
    tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    });
}

async fn assert_echoes<S: AsyncReadExt + AsyncWriteExt + Unpin>(stream: &mut S, byte: u8) {
    stream.write_all(&[byte]).await.unwrap();
    assert_eq!(stream.read_u8().await.unwrap(), byte);
}

/// Starts the agent end with an opener, returning that opener.
async fn agent_with_opener(io: tokio::io::DuplexStream) -> HostOpener {
    let (opener_tx, opener_rx) = oneshot::channel();
    tokio::spawn(serve_with_opener(io, move |opener| {
        let _ = opener_tx.send(opener);
        echo
    }));
    opener_rx.await.unwrap()
}

#[tokio::test]
async fn the_agent_opens_streams_the_host_handles() {
    let (host_end, agent_end) = tokio::io::duplex(1 << 20);
    let client = AgentClient::connect_with_inbound(host_end, echo);
    let opener = agent_with_opener(agent_end).await;

    let mut reverse = Vec::new();
    for n in 0..20u8 {
        let mut stream = opener.open_stream().await.expect("a reverse stream");
        assert_echoes(&mut stream, n).await;
        reverse.push(stream);
    }
    // Host-opened streams work at the same time, on the same session.
    let mut forward = client.open_stream().await.unwrap();
    assert_echoes(&mut forward, 99).await;
    for (n, stream) in reverse.iter_mut().enumerate() {
        assert_echoes(stream, n as u8 + 100).await;
    }
    // A large transfer each way survives yamux's windows.
    let payload = vec![0x5a; 3 << 20];
    let (mut reader, mut writer) = tokio::io::split(reverse.pop().unwrap());
    let sent = payload.clone();
    let write = tokio::spawn(async move { writer.write_all(&sent).await.unwrap() });
    let mut back = vec![0; payload.len()];
    reader.read_exact(&mut back).await.unwrap();
    write.await.unwrap();
    assert_eq!(back, payload);

    drop(client);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !opener.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the opener sees the session end when the host goes");
}

#[tokio::test]
async fn a_host_that_accepts_none_refuses_reverse_streams() {
    let (host_end, agent_end) = tokio::io::duplex(1 << 20);
    let client = AgentClient::connect(host_end);
    let opener = agent_with_opener(agent_end).await;

    let mut stream = opener.open_stream().await.expect("yamux opens it lazily");
    let _ = stream.write_all(b"x").await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
        .await
        .expect("the refusal arrives");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The session itself carries on.
    let mut forward = client.open_stream().await.unwrap();
    assert_echoes(&mut forward, 1).await;
}

#[tokio::test]
async fn a_hostile_agent_cannot_exceed_the_inbound_bound() {
    let (host_end, agent_end) = tokio::io::duplex(1 << 20);
    // The host answers one byte on every stream it is handed (which also acknowledges it:
    // yamux stops opening at 256 unacknowledged streams) and then holds it, as a slow
    // upstream would.
    let held: Arc<Mutex<Vec<ChannelStream>>> = Arc::default();
    let client = AgentClient::connect_with_inbound(host_end, {
        let held = held.clone();
        move |mut stream: ChannelStream| {
            let held = held.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(b"y").await;
                held.lock().unwrap().push(stream);
            });
        }
    });

    // A raw yamux agent that ignores any limit of its own.
    let mut connection = yamux::Connection::new(
        agent_end.compat(),
        yamux::Config::default(),
        yamux::Mode::Server,
    );
    let (open_tx, mut open_rx) =
        tokio::sync::mpsc::unbounded_channel::<oneshot::Sender<yamux::Stream>>();
    tokio::spawn(async move {
        let mut waiting = std::collections::VecDeque::new();
        std::future::poll_fn(|cx| {
            while let std::task::Poll::Ready(Some(reply)) = open_rx.poll_recv(cx) {
                waiting.push_back(reply);
            }
            while !waiting.is_empty() {
                match connection.poll_new_outbound(cx) {
                    std::task::Poll::Ready(Ok(stream)) => {
                        let _ = waiting.pop_front().unwrap().send(stream);
                    }
                    std::task::Poll::Ready(Err(_)) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => break,
                }
            }
            loop {
                match connection.poll_next_inbound(cx) {
                    std::task::Poll::Ready(Some(Ok(_))) => {}
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await
    });
    let open = || async {
        let (reply, stream) = oneshot::channel();
        open_tx.send(reply).unwrap();
        let mut stream = stream.await.unwrap().compat();
        // The host learns of a stream with its first frame.
        stream.write_all(b"x").await.unwrap();
        stream.flush().await.unwrap();
        let mut answer = [0u8; 1];
        let answered = stream.read(&mut answer).await;
        (stream, answered.ok() == Some(1))
    };

    let extra = 16;
    let mut streams = Vec::new();
    for n in 0..MAX_INBOUND_STREAMS + extra {
        let (stream, answered) = open().await;
        // Within the bound each is answered; beyond it each is refused (EOF or reset).
        assert_eq!(answered, n < MAX_INBOUND_STREAMS, "stream {n}");
        streams.push(stream);
    }
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while held.lock().unwrap().len() < MAX_INBOUND_STREAMS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Give the extra ones time to arrive (and be refused).
        tokio::time::sleep(Duration::from_millis(200)).await;
    })
    .await;
    assert!(
        settled.is_ok(),
        "the host took the streams within its bound"
    );
    assert_eq!(held.lock().unwrap().len(), MAX_INBOUND_STREAMS);
    // Dropping held streams frees slots for new ones; the session carried on throughout.
    held.lock().unwrap().truncate(MAX_INBOUND_STREAMS - 4);
    for _ in 0..4 {
        let (stream, answered) = open().await;
        assert!(answered, "a freed slot is reused");
        streams.push(stream);
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        while held.lock().unwrap().len() < MAX_INBOUND_STREAMS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("freed slots are reused");
    assert!(!client.is_closed());
}

#[tokio::test]
async fn plain_serve_still_works() {
    let (host_end, agent_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(serve(agent_end, echo));
    let client = AgentClient::connect(host_end);
    let mut stream = client.open_stream().await.unwrap();
    assert_echoes(&mut stream, 3).await;
}
