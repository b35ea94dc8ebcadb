//! A tiny "browser" for the consent page: fetches the authorize page over real
//! HTTP, fills in its form and submits it like a browser would.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{append_query, html_unescape};

/// What the customer does on the consent page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consent {
    /// Press "Authorize" (for a bot install: into the preselected server,
    /// i.e. the first one the user manages unless the URL named one).
    Authorize,
    /// Press "Cancel".
    Cancel,
    /// Pick this server in the bot-install selector and press "Authorize".
    InstallBot {
        /// The server to add the bot to.
        guild_id: u64,
    },
}

/// Why [`Sandbox::consent`](crate::Sandbox::consent) failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    /// Only plain `http://host:port/path?query` URLs are supported.
    #[error("unsupported URL {0:?} (only http:// URLs are supported)")]
    BadUrl(String),
    /// Talking to the server failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server's answer was not parseable HTTP.
    #[error("malformed HTTP response")]
    MalformedResponse,
    /// The authorize page did not answer 200 (e.g. unknown client_id).
    #[error("authorize page answered {status}: {body}")]
    Page {
        /// HTTP status.
        status: u16,
        /// Response body (the error page).
        body: String,
    },
    /// No `<form>` on the page.
    #[error("no form on the authorize page")]
    NoForm,
    /// A browser could not pick this value: it is not among the options.
    #[error("field {field:?} has no option {value:?}")]
    NoSuchOption {
        /// Field name.
        field: String,
        /// Wanted value.
        value: String,
    },
    /// The form lacks the wanted button.
    #[error("the form has no {0:?} button")]
    NoButton(String),
    /// Submitting did not redirect.
    #[error("form submission answered {status} without a redirect: {body}")]
    NoRedirect {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `(authority, path_and_query)` of an `http://` URL.
fn split_url(url: &str) -> Result<(String, String), ConsentError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ConsentError::BadUrl(url.to_owned()))?;
    let rest = rest.split('#').next().unwrap_or(rest);
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(ConsentError::BadUrl(url.to_owned()));
    }
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Ok((authority.to_owned(), path))
}

async fn http(method: &str, url: &str, form: Option<&str>) -> Result<HttpResponse, ConsentError> {
    let (authority, path) = split_url(url)?;
    let mut stream = TcpStream::connect(&authority).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sandbox-discord-consent\r\n\
Accept: text/html\r\nConnection: close\r\n"
    );
    if let Some(body) = form {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, ConsentError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ConsentError::MalformedResponse)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| ConsentError::MalformedResponse)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(ConsentError::MalformedResponse)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or(ConsentError::MalformedResponse)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// Minimal HTML form model
// ---------------------------------------------------------------------------

struct Tag {
    name: String,
    attrs: Vec<(String, Option<String>)>,
    /// Byte offset just after the `>`.
    end: usize,
}

impl Tag {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }
    fn has(&self, name: &str) -> bool {
        self.attrs.iter().any(|(k, _)| k == name)
    }
}

fn tags(html: &str) -> Vec<Tag> {
    let b = html.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = html[i..].find('<') {
        let mut j = i + off + 1;
        let start = j;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'/' || b[j] == b'!') {
            j += 1;
        }
        let name = html[start..j].to_ascii_lowercase();
        let mut attrs = Vec::new();
        loop {
            while j < b.len() && (b[j].is_ascii_whitespace() || b[j] == b'/') {
                j += 1;
            }
            if j >= b.len() || b[j] == b'>' {
                break;
            }
            let s = j;
            while j < b.len() && !b[j].is_ascii_whitespace() && !matches!(b[j], b'=' | b'>' | b'/')
            {
                j += 1;
            }
            let key = html[s..j].to_ascii_lowercase();
            let mut value = None;
            if j < b.len() && b[j] == b'=' {
                j += 1;
                if j < b.len() && (b[j] == b'"' || b[j] == b'\'') {
                    let q = b[j];
                    let vs = j + 1;
                    j = vs;
                    while j < b.len() && b[j] != q {
                        j += 1;
                    }
                    value = Some(html_unescape(&html[vs..j.min(b.len())]));
                    j += 1;
                } else {
                    let vs = j;
                    while j < b.len() && !b[j].is_ascii_whitespace() && b[j] != b'>' {
                        j += 1;
                    }
                    value = Some(html_unescape(&html[vs..j]));
                }
            }
            if key.is_empty() {
                j += 1;
            } else {
                attrs.push((key, value));
            }
        }
        let end = (j + 1).min(b.len());
        out.push(Tag { name, attrs, end });
        i = end;
        if i >= b.len() {
            break;
        }
    }
    out
}

enum Control {
    /// A successful control with a fixed value (hidden/text inputs).
    Value {
        name: String,
        value: String,
    },
    Select {
        name: String,
        options: Vec<String>,
        selected: Option<String>,
    },
    Button {
        name: String,
        value: String,
    },
}

struct Form {
    action: Option<String>,
    controls: Vec<Control>,
}

fn parse_form(html: &str) -> Option<Form> {
    let all = tags(html);
    let start = all.iter().position(|t| t.name == "form")?;
    let action = all[start].attr("action").map(str::to_owned);
    let mut controls = Vec::new();
    let mut select: Option<Control> = None;
    for t in &all[start + 1..] {
        match t.name.as_str() {
            "/form" => break,
            "input" => {
                let Some(name) = t.attr("name") else { continue };
                let kind = t.attr("type").unwrap_or("text").to_ascii_lowercase();
                let value = t.attr("value").unwrap_or("").to_owned();
                match kind.as_str() {
                    "submit" => controls.push(Control::Button {
                        name: name.to_owned(),
                        value,
                    }),
                    "checkbox" | "radio" if !t.has("checked") => {}
                    "checkbox" | "radio" if value.is_empty() => controls.push(Control::Value {
                        name: name.to_owned(),
                        value: "on".into(),
                    }),
                    "button" | "reset" | "image" | "file" => {}
                    _ => controls.push(Control::Value {
                        name: name.to_owned(),
                        value,
                    }),
                }
            }
            "button" => {
                let kind = t.attr("type").unwrap_or("submit");
                if let (Some(name), true) = (t.attr("name"), kind.eq_ignore_ascii_case("submit")) {
                    controls.push(Control::Button {
                        name: name.to_owned(),
                        value: t.attr("value").unwrap_or("").to_owned(),
                    });
                }
            }
            "select" => {
                select = t.attr("name").map(|n| Control::Select {
                    name: n.to_owned(),
                    options: Vec::new(),
                    selected: None,
                });
            }
            "option" => {
                if let Some(Control::Select {
                    options, selected, ..
                }) = &mut select
                {
                    let value = match t.attr("value") {
                        Some(v) => v.to_owned(),
                        None => {
                            let text = &html[t.end..];
                            html_unescape(text[..text.find('<').unwrap_or(text.len())].trim())
                        }
                    };
                    if t.has("selected") {
                        *selected = Some(value.clone());
                    }
                    options.push(value);
                }
            }
            "/select" => controls.extend(select.take()),
            _ => {}
        }
    }
    Some(Form { action, controls })
}

fn resolve(page_url: &str, action: Option<&str>) -> Result<String, ConsentError> {
    let (authority, path) = split_url(page_url)?;
    Ok(match action {
        None | Some("") => page_url.to_owned(),
        Some(a) if a.starts_with("http://") => a.to_owned(),
        Some(a) if a.starts_with('/') => format!("http://{authority}{a}"),
        Some(a) => {
            let dir = path
                .split('?')
                .next()
                .and_then(|p| p.rsplit_once('/'))
                .map_or("", |(d, _)| d);
            format!("http://{authority}{dir}/{a}")
        }
    })
}

/// Performs the consent of `user_id` on the page at `authorize_url`.
pub(crate) async fn perform(
    authorize_url: &str,
    user_id: u64,
    consent: Consent,
) -> Result<String, ConsentError> {
    // The browser is "logged in" as `user_id`.
    let url = append_query(authorize_url, &[("login", &user_id.to_string())]);
    let page = http("GET", &url, None).await?;
    if page.status != 200 {
        return Err(ConsentError::Page {
            status: page.status,
            body: page.body,
        });
    }
    let form = parse_form(&page.body).ok_or(ConsentError::NoForm)?;
    let button = match consent {
        Consent::Cancel => "cancel",
        Consent::Authorize | Consent::InstallBot { .. } => "authorize",
    };
    let user = user_id.to_string();
    let guild = match consent {
        Consent::InstallBot { guild_id } => Some(guild_id.to_string()),
        _ => None,
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut pressed = false;
    for control in &form.controls {
        match control {
            Control::Value { name, value } => {
                if name == "guild_id"
                    && let Some(g) = &guild
                    && g != value
                {
                    return Err(ConsentError::NoSuchOption {
                        field: name.clone(),
                        value: g.clone(),
                    });
                }
                pairs.push((name.clone(), value.clone()));
            }
            Control::Select {
                name,
                options,
                selected,
            } => {
                let wanted = match name.as_str() {
                    "login" => Some(&user),
                    "guild_id" => guild.as_ref(),
                    _ => None,
                };
                let value = match wanted {
                    Some(w) if options.contains(w) => w.clone(),
                    Some(w) => {
                        return Err(ConsentError::NoSuchOption {
                            field: name.clone(),
                            value: w.clone(),
                        });
                    }
                    None => match selected.clone().or_else(|| options.first().cloned()) {
                        Some(v) => v,
                        None => continue, // an empty select submits nothing
                    },
                };
                pairs.push((name.clone(), value));
            }
            Control::Button { name, value } => {
                if !pressed && value == button {
                    pressed = true;
                    pairs.push((name.clone(), value.clone()));
                }
            }
        }
    }
    if !pressed {
        return Err(ConsentError::NoButton(button.to_owned()));
    }
    let body = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    let target = resolve(&url, form.action.as_deref())?;
    let resp = http("POST", &target, Some(&body)).await?;
    match (resp.status, resp.header("location")) {
        (301 | 302 | 303 | 307 | 308, Some(loc)) => Ok(loc.to_owned()),
        _ => Err(ConsentError::NoRedirect {
            status: resp.status,
            body: resp.body,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let html = r#"<form method="post" action="/x"><input type="hidden" name="a" value="1&amp;2">
<select name="s"><option value="p">P</option><option value="q" selected>Q</option></select>
<select name=t><option>first</option></select>
<button type="submit" name="action" value="go">Go</button></form><input name="outside">"#;
        let f = parse_form(html).unwrap();
        assert_eq!(f.action.as_deref(), Some("/x"));
        assert_eq!(f.controls.len(), 4);
        match &f.controls[0] {
            Control::Value { value, .. } => assert_eq!(value, "1&2"),
            _ => panic!("expected value"),
        }
        match &f.controls[1] {
            Control::Select { selected, .. } => assert_eq!(selected.as_deref(), Some("q")),
            _ => panic!("expected select"),
        }
        match &f.controls[2] {
            Control::Select { options, .. } => assert_eq!(options, &["first"]),
            _ => panic!("expected select"),
        }
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert_eq!(
            resolve("http://h:1/oauth2/authorize?x", Some("/y")).unwrap(),
            "http://h:1/y"
        );
    }
}
