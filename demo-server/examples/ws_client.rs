//! The seed's WebSocket client: subscribes to `test` and publishes a message every 5 seconds,
//! printing everything it receives.
//!
//! Start the server (`cargo run -p demo-server`), then:
//!
//! ```text
//! cargo run -p demo-server --example ws_client                  # ws://127.0.0.1:8080/ws
//! cargo run -p demo-server --example ws_client -- 127.0.0.1:8081 bob
//! ```

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::{connect_async, tungstenite::Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let user = args.next().unwrap_or_else(|| "example".to_owned());
    let (ws, _) = connect_async(format!("ws://{addr}/ws?user_id={user}")).await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::Text(r#"{"type":"subscribe","channel":"test"}"#.into())).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let msg = serde_json::json!({"type": "message", "channel": "test", "content": format!("hello #{n} from {user}")});
                tx.send(Message::Text(msg.to_string().into())).await?;
            }
            frame = rx.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Close(frame))) => {
                    println!("closed: {frame:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
