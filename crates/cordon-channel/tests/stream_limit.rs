//! More streams than the channel admits: the extra one is refused on its own, the session and
//! the open streams carry on, and a closed stream's slot is reused. Both yamux ends are real,
//! over an in-memory byte stream.

use cordon_channel::{serve, AgentClient, ChannelError, ChannelStream, MAX_OPEN_STREAMS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes every stream back until the host closes it.
fn echo(stream: ChannelStream) {
    tokio::spawn(async move {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    });
}

/// Opens a stream and waits for one byte to come back, so both ends know of it.
async fn open_echoed(client: &AgentClient) -> Result<ChannelStream, ChannelError> {
    let mut stream = client.open_stream().await?;
    assert_echoes(&mut stream, 7).await;
    Ok(stream)
}

async fn assert_echoes(stream: &mut ChannelStream, byte: u8) {
    stream.write_all(&[byte]).await.unwrap();
    assert_eq!(stream.read_u8().await.unwrap(), byte);
}

#[tokio::test]
async fn an_extra_stream_is_refused_without_ending_the_session() {
    let (host_end, agent_end) = tokio::io::duplex(1 << 20);
    let agent = tokio::spawn(serve(agent_end, echo));
    let client = AgentClient::connect(host_end);

    let mut open = Vec::with_capacity(MAX_OPEN_STREAMS);
    for _ in 0..MAX_OPEN_STREAMS {
        open.push(
            open_echoed(&client)
                .await
                .expect("a stream within the limit"),
        );
    }

    let refused = client.open_stream().await;
    assert!(
        matches!(refused, Err(ChannelError::TooManyStreams(MAX_OPEN_STREAMS))),
        "{refused:?}"
    );
    assert!(!client.is_closed());
    assert!(!agent.is_finished());
    for (n, stream) in open.iter_mut().enumerate().step_by(101) {
        assert_echoes(stream, n as u8).await;
    }

    // Closing some frees their slots, for a waiting opener too.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { open_echoed(&client).await }
    });
    open.truncate(MAX_OPEN_STREAMS - 8);
    let mut reopened = waiting.await.unwrap().expect("a stream after one closed");
    assert_echoes(&mut reopened, 1).await;
    for _ in 0..7 {
        open.push(open_echoed(&client).await.expect("a freed slot"));
    }
    assert!(client.open_stream().await.is_err());

    // Every stream can close and the full limit be used again, many times over.
    open.clear();
    drop(reopened);
    for _ in 0..MAX_OPEN_STREAMS {
        open.push(
            open_echoed(&client)
                .await
                .expect("a stream after all closed"),
        );
    }
    assert_echoes(&mut open[0], 2).await;
    assert!(!agent.is_finished());
}
