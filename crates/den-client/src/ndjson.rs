//! NDJSON progress streams, read a line at a time as the server flushes them.

use reqwest::Response;

use crate::{Error, Result, StreamMessage};

pub struct NdjsonStream {
    resp: Response,
    buf: Vec<u8>,
    done: bool,
}

impl NdjsonStream {
    pub(crate) fn new(resp: Response) -> Self {
        NdjsonStream {
            resp,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next message, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<StreamMessage>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(parse(&line));
            }
            if self.done {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                // A last line without its newline still counts.
                let line = std::mem::take(&mut self.buf);
                return Some(parse(&line));
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                Ok(None) => self.done = true,
                Err(e) => {
                    self.done = true;
                    self.buf.clear();
                    return Some(Err(Error::Http(e)));
                }
            }
        }
    }

    /// Read to the end, handing each message to `each`; the `complete`
    /// message is returned, an `error` line becomes [`Error::Stream`].
    pub async fn finish(mut self, mut each: impl FnMut(&StreamMessage)) -> Result<StreamMessage> {
        let mut complete = None;
        while let Some(m) = self.next().await {
            let m = m?;
            each(&m);
            if m.is_error() {
                return Err(Error::Stream(m.text().to_string()));
            }
            if m.is_complete() {
                complete = Some(m);
            }
        }
        complete.ok_or_else(|| Error::Decode("the stream ended before it reported completion".into()))
    }
}

fn parse(line: &[u8]) -> Result<StreamMessage> {
    serde_json::from_slice(line).map_err(|e| {
        Error::Decode(format!(
            "bad NDJSON line {:?}: {e}",
            String::from_utf8_lossy(line)
        ))
    })
}
