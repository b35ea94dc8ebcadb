//! The pure part of an email: from what it is about to a MIME message with a
//! plain-text and an HTML part (no images, no external assets, no tracking).

use lettre::Message;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};

use super::texts::{self, Texts};
use crate::i18n::{Lang, escape_html};

/// Which email.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Letter {
    /// The grant needs the customer's Discord account: a "Join the Discord" button.
    Join,
    /// The same, later, as a reminder.
    Reminder,
    /// The grant is delivered (or failed): a link to the access page.
    Access,
}

impl Letter {
    /// Its name in the grant's history.
    pub fn as_str(self) -> &'static str {
        match self {
            Letter::Join => "join",
            Letter::Reminder => "reminder",
            Letter::Access => "access",
        }
    }
}

/// Everything an email says and where it goes.
#[derive(Clone, Debug)]
pub struct Draft<'a> {
    pub letter: Letter,
    pub lang: Lang,
    /// The entitlement's name (in `lang` where the merchant translated it).
    pub product: &'a str,
    /// The Discord server's name.
    pub server: &'a str,
    /// The grant's Discord authorization link (`Join` and `Reminder`).
    pub join_url: Option<&'a str>,
    /// The customer's access page.
    pub access_url: &'a str,
    pub from: Mailbox,
    pub to: Mailbox,
    /// The business's support address.
    pub reply_to: Option<Mailbox>,
    /// `Message-ID`: the same for every attempt at the same email, so a mail client
    /// shows a repeat (after a crash between sending and recording) once.
    pub message_id: String,
}

fn fill(s: &str, product: &str, server: &str) -> String {
    s.replace("{product}", product).replace("{server}", server)
}

/// The subject, plain text and HTML of a draft.
pub fn render(d: &Draft<'_>) -> (String, String, String) {
    let t: &Texts = texts::of(d.lang);
    let (subject, intro) = match d.letter {
        Letter::Join => (t.join_subject, t.join_intro),
        Letter::Reminder => (t.reminder_subject, t.reminder_intro),
        Letter::Access => (t.access_subject, t.access_intro),
    };
    let subject = fill(subject, d.product, d.server);
    let (button, target) = match (d.letter, d.join_url) {
        (Letter::Join | Letter::Reminder, Some(url)) => (t.join_button, url),
        _ => (t.access_button, d.access_url),
    };
    let shows_access_hint = target != d.access_url;

    let mut plain = format!(
        "{}\n\n{}\n\n{}:\n{}\n",
        t.greeting,
        fill(intro, d.product, d.server),
        button,
        target
    );
    if shows_access_hint {
        plain.push_str(&format!("\n{}\n{}\n", t.access_hint, d.access_url));
    }
    if d.reply_to.is_some() {
        plain.push_str(&format!("\n{}\n", t.reply_hint));
    }
    plain.push_str(&format!("\n-- \n{}\n", fill(t.footer, d.product, d.server)));

    let (p, s) = (escape_html(d.product), escape_html(d.server));
    let mut html = format!(
        "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title></head>\
         <body style=\"font-family:sans-serif;line-height:1.5;color:#1f2328;max-width:36em;margin:0 auto;padding:1em\">\
         <p>{greeting}</p><p>{intro}</p>\
         <p><a href=\"{target}\" style=\"display:inline-block;background:#3d45c4;color:#ffffff;\
         padding:0.7em 1.2em;border-radius:6px;text-decoration:none;font-weight:bold\">{button}</a></p>",
        lang = d.lang.tag(),
        title = escape_html(&subject),
        greeting = escape_html(t.greeting),
        intro = fill(&escape_html(intro), &p, &s),
        target = escape_html(target),
        button = escape_html(button),
    );
    if shows_access_hint {
        html.push_str(&format!(
            "<p>{} <a href=\"{url}\" style=\"color:#3d45c4\">{label}</a></p>",
            escape_html(t.access_hint),
            url = escape_html(d.access_url),
            label = escape_html(t.access_button),
        ));
    }
    if d.reply_to.is_some() {
        html.push_str(&format!("<p>{}</p>", escape_html(t.reply_hint)));
    }
    html.push_str(&format!(
        "<hr style=\"border:none;border-top:1px solid #d0d7de\">\
         <p style=\"font-size:0.85em;color:#59636e\">{}</p></body></html>",
        fill(&escape_html(t.footer), &p, &s)
    ));
    (subject, plain, html)
}

/// The MIME message of a draft.
pub fn message(d: &Draft<'_>) -> Result<Message, lettre::error::Error> {
    let (subject, plain, html) = render(d);
    let mut b = Message::builder()
        .from(d.from.clone())
        .to(d.to.clone())
        .subject(subject)
        .message_id(Some(d.message_id.clone()))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Content-Language"),
            d.lang.tag().into(),
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-generated".into(),
        ));
    if let Some(r) = &d.reply_to {
        b = b.reply_to(r.clone());
    }
    b.multipart(MultiPart::alternative_plain_html(plain, html))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(letter: Letter, lang: Lang) -> Draft<'static> {
        Draft {
            letter,
            lang,
            product: "VIP <Pass>",
            server: "Acme & Co",
            join_url: Some("https://discord.test/authorize?a=1&state=x"),
            access_url: "https://gg.test/access?t=abc",
            from: "Acme Access <access@acme.test>".parse().unwrap(),
            to: "buyer@example.test".parse().unwrap(),
            reply_to: Some("help@acme.test".parse().unwrap()),
            message_id: "<eml.x@gg.test>".into(),
        }
    }

    #[test]
    fn a_join_email_names_the_product_and_server_with_one_join_button() {
        let (subject, plain, html) = render(&draft(Letter::Join, Lang::En));
        assert_eq!(subject, "Join Acme & Co on Discord");
        assert!(
            plain.contains("VIP <Pass>") && plain.contains("Acme & Co"),
            "{plain}"
        );
        assert!(plain.contains("https://discord.test/authorize?a=1&state=x"));
        assert!(plain.contains("https://gg.test/access?t=abc"));
        assert!(html.contains("VIP &lt;Pass&gt;") && html.contains("Acme &amp; Co"));
        assert!(!html.contains("<Pass>"), "{html}");
        assert_eq!(html.matches("Join the Discord").count(), 1);
        assert!(html.contains("href=\"https://discord.test/authorize?a=1&amp;state=x\""));
        assert!(html.contains("<html lang=\"en\">"));
        assert!(plain.contains("Reply to this email"));
    }

    #[test]
    fn an_access_email_links_only_the_access_page() {
        let mut d = draft(Letter::Access, Lang::De);
        d.join_url = None;
        d.reply_to = None;
        let (subject, plain, html) = render(&d);
        assert_eq!(subject, "Dein Zugang zu Acme & Co auf Discord");
        assert!(!plain.contains("discord.test/authorize") && !html.contains("authorize"));
        assert!(html.contains("Zugangsseite öffnen") && html.contains("lang=\"de\""));
        assert!(!plain.contains("Antworte"));
    }

    #[test]
    fn names_cannot_add_headers() {
        let mut d = draft(Letter::Join, Lang::En);
        d.server = "Acme\r\nBcc: thief@evil.test";
        d.product = "VIP\nX-Injected: 1";
        let raw = String::from_utf8(message(&d).unwrap().formatted()).unwrap();
        let headers = raw.split("\r\n\r\n").next().unwrap();
        for line in headers.lines() {
            assert!(!line.starts_with("Bcc:"), "{raw}");
            assert!(!line.starts_with("X-Injected:"), "{raw}");
        }
    }

    #[test]
    fn the_message_has_both_parts_and_the_headers() {
        let m = message(&draft(Letter::Reminder, Lang::Ja)).unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("text/plain") && raw.contains("text/html"));
        assert!(raw.contains("Reply-To: help@acme.test"));
        assert!(raw.contains("Message-ID: <eml.x@gg.test>"));
        assert!(raw.contains("Content-Language: ja"));
        assert!(raw.contains("Auto-Submitted: auto-generated"));
    }
}
