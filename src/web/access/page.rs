//! The pure part of the access pages: from what a customer has to HTML, in their
//! language. Self-contained (inline CSS, no script, no image, no external asset),
//! usable with a keyboard alone and down to narrow phones.

use super::texts::{self, Texts};
use crate::i18n::{Lang, escape_html as esc};

/// What one grant shows and lets the customer do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for their Discord account: *Connect*.
    Pending,
    /// Delivered: *Get my role back* (for a member who left or lost the role).
    Delivered,
    /// Discord needs a new authorization: *Reconnect*.
    NeedsAuthorization,
    /// Their account is in too many servers: leave one, *Try again*.
    TooManyServers,
    /// Banned from the server: nothing to do here.
    Banned,
    /// The server's setup (the merchant's side): the merchant was told.
    MerchantTold,
    /// Ended, with the revocation reason.
    Ended(Option<String>),
}

impl State {
    /// The state of a grant from its status and codes.
    pub fn of(status: &str, error_code: Option<&str>, revocation_reason: Option<&str>) -> Self {
        match status {
            "Pending" => State::Pending,
            "Delivered" => State::Delivered,
            "Revoked" => State::Ended(revocation_reason.map(str::to_string)),
            _ => match error_code {
                Some("discord_reauthorization_required") => State::NeedsAuthorization,
                Some("discord_too_many_guilds") => State::TooManyServers,
                Some("discord_user_banned") => State::Banned,
                _ => State::MerchantTold,
            },
        }
    }
}

/// One grant on the page.
#[derive(Clone, Debug)]
pub struct Item {
    pub grant_id: String,
    pub product: String,
    pub server: String,
    pub role: Role,
    pub state: State,
}

/// What a grant gives in its server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Membership of the server only.
    Membership,
    /// A role, by its name.
    Named(String),
    /// A role whose name guildgate has not seen (an entitlement saved before names
    /// were kept): the row is left out.
    Unnamed,
}

/// The Discord account a customer has connected (or is about to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub username: Option<String>,
    pub global_name: Option<String>,
}

impl Account {
    /// How its owner knows it: the display name, then the username, then the id.
    pub fn shown(&self) -> &str {
        self.global_name
            .as_deref()
            .or(self.username.as_deref())
            .unwrap_or(&self.id)
    }
}

/// Every page the access routes show.
#[derive(Clone, Debug)]
pub enum Page {
    Access {
        /// The access token, carried by every form.
        token: String,
        account: Option<Account>,
        /// Discord refused the account's stored authorization: ask to connect again.
        reauthorize: bool,
        items: Vec<Item>,
        /// A notice after an action ("your access is being restored").
        restored: bool,
    },
    /// Confirm a switch from `now` to `new`.
    Confirm {
        now: Account,
        new: Account,
        /// The signed confirmation, posted back.
        confirmation: String,
        /// The access page, to go back to.
        back: String,
    },
    /// The account chosen is the one connected already.
    Same {
        account: Account,
        back: String,
    },
    Switched {
        account: Account,
        back: String,
    },
    Expired,
    Invalid,
    TooMany,
    Unavailable,
    /// Discord refused the authorization the customer came back with (a code used
    /// already, or too old): trying the same address again cannot help, going back to
    /// the page and choosing the account again can.
    Refused {
        back: String,
    },
}

const STYLE: &str = "*{box-sizing:border-box}\
body{font-family:system-ui,sans-serif;background:#f2f3f5;color:#1f2328;margin:0;padding:1rem;line-height:1.5}\
main{background:#fff;border-radius:8px;padding:1.25rem;max-width:40rem;margin:1rem auto;box-shadow:0 2px 10px rgba(0,0,0,.1);overflow-wrap:anywhere}\
h1{font-size:1.5rem;margin:0 0 .5rem}h2{font-size:1.15rem;margin:1.5rem 0 .5rem}h3{font-size:1.05rem;margin:0 0 .25rem}\
ul.grants{list-style:none;padding:0;margin:0}li.grant{border:1px solid #d0d7de;border-radius:6px;padding:.75rem 1rem;margin:.75rem 0}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.15rem .75rem;margin:.25rem 0 .5rem}dt{color:#4c545c}dd{margin:0}\
button,.button{font:inherit;display:inline-block;background:#3d45c4;color:#fff;border:0;border-radius:6px;padding:.55rem 1rem;cursor:pointer;text-decoration:none}\
button.secondary,.button.secondary{background:#fff;color:#3d45c4;border:1px solid #3d45c4}\
button:focus-visible,.button:focus-visible,a:focus-visible{outline:3px solid #0b5cad;outline-offset:2px}\
a{color:#3d45c4}.hint{color:#4c545c;margin:.25rem 0}.notice{background:#dafbe1;border:1px solid #1a7f37;border-radius:6px;padding:.5rem .75rem}\
.warning{background:#fff8c5;border:1px solid #9a6700;border-radius:6px;padding:.5rem .75rem}\
.account{display:flex;align-items:center;gap:.75rem;margin:.5rem 0}\
.avatar{flex:none;width:2.5rem;height:2.5rem;border-radius:50%;display:inline-flex;align-items:center;justify-content:center;color:#fff;font-weight:bold;font-size:1.1rem}\
.accounts{display:grid;gap:.75rem;margin:.75rem 0}.actions{display:flex;flex-wrap:wrap;gap:.75rem;align-items:center;margin-top:1rem}\
form{margin:0}";

/// A colour per account, dark enough for white text (WCAG AA).
fn avatar_colour(id: &str) -> &'static str {
    const COLOURS: [&str; 6] = [
        "#3d45c4", "#1a7f37", "#9a3412", "#6d28d9", "#0e7490", "#9d174d",
    ];
    let n = id
        .bytes()
        .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
    COLOURS[n % COLOURS.len()]
}

/// An account as its initial on a coloured disc and its names. Discord's own avatar
/// image is not loaded: the page loads nothing from elsewhere.
fn account_html(a: &Account) -> String {
    let initial: String = a
        .shown()
        .chars()
        .next()
        .unwrap_or('?')
        .to_uppercase()
        .collect();
    let handle = match (&a.global_name, &a.username) {
        (Some(_), Some(u)) => format!(" <span class=\"hint\">@{}</span>", esc(u)),
        _ => String::new(),
    };
    format!(
        "<div class=\"account\"><span class=\"avatar\" aria-hidden=\"true\" style=\"background:{}\">{}</span>\
         <span><b>{}</b>{handle}</span></div>",
        avatar_colour(&a.id),
        esc(&initial),
        esc(a.shown()),
    )
}

fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
        esc(value)
    )
}

/// A form of one button that posts `fields` to `action`.
fn button(action: &str, fields: &[(&str, &str)], label: &str, class: &str) -> String {
    let inputs: String = fields.iter().map(|(k, v)| hidden(k, v)).collect();
    format!(
        "<form method=\"post\" action=\"{action}\">{inputs}<button type=\"submit\"{}>{}</button></form>",
        if class.is_empty() {
            String::new()
        } else {
            format!(" class=\"{class}\"")
        },
        esc(label)
    )
}

fn reason(t: &Texts, r: Option<&str>) -> &'static str {
    match r {
        Some("refund") => t.reason_refund,
        Some("dispute_lost") => t.reason_dispute,
        Some("subscription_cancelled") | Some("plan_changed") => t.reason_cancelled,
        Some("subscription_paused") => t.reason_paused,
        Some("subscription_on_hold") | Some("subscription_failed") => t.reason_on_hold,
        Some("subscription_expired") | Some("expired") => t.reason_expired,
        _ => t.reason_other,
    }
}

fn item_html(t: &Texts, token: &str, i: &Item) -> String {
    let fields = [("t", token), ("grant", i.grant_id.as_str())];
    let (status, action) = match &i.state {
        State::Pending => (
            esc(t.pending),
            button("/access/connect", &fields, t.connect, ""),
        ),
        State::Delivered => (
            esc(t.delivered),
            format!(
                "<p class=\"hint\">{}</p>{}",
                esc(t.role_back_hint),
                button("/access/restore", &fields, t.role_back, "secondary")
            ),
        ),
        State::NeedsAuthorization => (
            format!("{} {}", esc(t.failed), esc(t.reconnect_hint)),
            button("/access/connect", &fields, t.reconnect, ""),
        ),
        State::TooManyServers => (
            format!("{} {}", esc(t.failed), esc(t.too_many_servers)),
            button("/access/restore", &fields, t.try_again, ""),
        ),
        State::Banned => (
            format!("{} {}", esc(t.failed), esc(t.banned)),
            String::new(),
        ),
        State::MerchantTold => (
            format!("{} {}", esc(t.failed), esc(t.merchant_told)),
            String::new(),
        ),
        State::Ended(r) => (
            esc(&t.ended_reason.replace("{reason}", reason(t, r.as_deref()))),
            String::new(),
        ),
    };
    let role = match &i.role {
        Role::Membership => Some(esc(t.membership_only)),
        Role::Named(n) => Some(esc(n)),
        Role::Unnamed => None,
    }
    .map(|r| format!("<dt>{}</dt><dd>{r}</dd>", esc(t.role)))
    .unwrap_or_default();
    format!(
        "<li class=\"grant\"><h3>{product}</h3><dl><dt>{ls}</dt><dd>{server}</dd>{role}\
         <dt>{lst}</dt><dd>{status}</dd></dl>{action}</li>",
        product = esc(&i.product),
        ls = esc(t.server),
        server = esc(&i.server),
        lst = esc(t.status),
    )
}

fn document(lang: Lang, title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head>\
         <body><main><h1>{title}</h1>{body}</main></body></html>",
        lang = lang.tag(),
        title = esc(title),
    )
}

impl Page {
    pub fn html(&self, lang: Lang) -> String {
        let t = texts::of(lang);
        match self {
            Page::Access {
                token,
                account,
                reauthorize,
                items,
                restored,
            } => {
                let mut body = format!("<p>{}</p>", esc(t.intro));
                if *restored {
                    body.push_str(&format!(
                        "<p class=\"notice\" role=\"status\">{}</p>",
                        esc(t.requested)
                    ));
                }
                if items.is_empty() {
                    body.push_str(&format!("<p>{}</p>", esc(t.empty)));
                } else {
                    body.push_str("<ul class=\"grants\">");
                    for i in items {
                        body.push_str(&item_html(t, token, i));
                    }
                    body.push_str("</ul>");
                }
                body.push_str(&format!(
                    "<section aria-labelledby=\"account\"><h2 id=\"account\">{}</h2>",
                    esc(t.account_title)
                ));
                match account {
                    Some(a) => {
                        body.push_str(&account_html(a));
                        if *reauthorize {
                            // The same flow: choosing the same account connects it again.
                            body.push_str(&format!(
                                "<p class=\"warning\">{}</p>{}",
                                esc(t.reconnect_hint),
                                button("/access/switch", &[("t", token)], t.reconnect, "")
                            ));
                        }
                        body.push_str(&format!(
                            "<p class=\"hint\">{}</p>{}",
                            esc(t.use_another_hint),
                            button(
                                "/access/switch",
                                &[("t", token)],
                                t.use_another,
                                "secondary"
                            )
                        ));
                    }
                    None => body.push_str(&format!("<p>{}</p>", esc(t.account_none))),
                }
                body.push_str("</section>");
                document(lang, t.title, &body)
            }
            Page::Confirm {
                now,
                new,
                confirmation,
                back,
            } => {
                let body = format!(
                    "<p>{intro}</p><div class=\"accounts\"><section aria-labelledby=\"now\"><h2 id=\"now\">{ln}</h2>{a}</section>\
                     <section aria-labelledby=\"new\"><h2 id=\"new\">{lw}</h2>{b}</section></div>\
                     <div class=\"actions\">{confirm}<a class=\"button secondary\" href=\"{back}\">{cancel}</a></div>",
                    intro = esc(t.confirm_intro),
                    ln = esc(t.confirm_now),
                    a = account_html(now),
                    lw = esc(t.confirm_new),
                    b = account_html(new),
                    confirm = button(
                        "/access/switch/confirm",
                        &[("s", confirmation)],
                        &t.confirm_button.replace("{new}", new.shown()),
                        ""
                    ),
                    back = esc(back),
                    cancel = esc(t.cancel),
                );
                document(lang, t.confirm_title, &body)
            }
            Page::Same { account, back } => document(
                lang,
                t.same_title,
                &format!(
                    "<p>{}</p><p><a class=\"button\" href=\"{}\">{}</a></p>",
                    esc(&t.same.replace("{account}", account.shown())),
                    esc(back),
                    esc(t.back)
                ),
            ),
            Page::Switched { account, back } => document(
                lang,
                t.switched_title,
                &format!(
                    "{}<p>{}</p><p><a class=\"button\" href=\"{}\">{}</a></p>",
                    account_html(account),
                    esc(&t.switched.replace("{account}", account.shown())),
                    esc(back),
                    esc(t.back)
                ),
            ),
            Page::Expired => document(lang, t.expired_title, &format!("<p>{}</p>", esc(t.expired))),
            Page::Invalid => document(lang, t.invalid_title, &format!("<p>{}</p>", esc(t.invalid))),
            Page::TooMany => document(
                lang,
                t.too_many_title,
                &format!("<p>{}</p>", esc(t.too_many)),
            ),
            Page::Unavailable => document(
                lang,
                t.unavailable_title,
                &format!("<p>{}</p>", esc(t.unavailable)),
            ),
            Page::Refused { back } => document(
                lang,
                t.refused_title,
                &format!(
                    "<p>{}</p><p><a class=\"button\" href=\"{}\">{}</a></p>",
                    esc(t.refused),
                    esc(back),
                    esc(t.back)
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(state: State) -> Item {
        Item {
            grant_id: "grant_1".into(),
            product: "VIP <Pass>".into(),
            server: "Acme & Co".into(),
            role: Role::Named("Patrons".into()),
            state,
        }
    }

    fn access(items: Vec<Item>) -> Page {
        Page::Access {
            token: "tok.en\"".into(),
            account: Some(Account {
                id: "42".into(),
                username: Some("una".into()),
                global_name: Some("Una <U>".into()),
            }),
            reauthorize: false,
            items,
            restored: false,
        }
    }

    #[test]
    fn each_state_offers_its_one_action() {
        for (state, action, label) in [
            (State::Pending, Some("/access/connect"), "Connect Discord"),
            (
                State::Delivered,
                Some("/access/restore"),
                "Get my role back",
            ),
            (
                State::NeedsAuthorization,
                Some("/access/connect"),
                "Reconnect Discord",
            ),
            (State::TooManyServers, Some("/access/restore"), "Try again"),
            (State::Banned, None, "banned"),
            (State::MerchantTold, None, "The seller has been told"),
            (
                State::Ended(Some("refund".into())),
                None,
                "the purchase was refunded",
            ),
        ] {
            let h = access(vec![item(state.clone())]).html(Lang::En);
            assert!(h.contains(label), "{state:?}: {h}");
            let forms = h.matches("<form").count();
            // Every page also offers "Use another Discord account".
            assert_eq!(forms, 1 + usize::from(action.is_some()), "{state:?}");
            if let Some(a) = action {
                assert!(h.contains(&format!("action=\"{a}\"")), "{state:?}");
                assert!(h.contains("name=\"grant\" value=\"grant_1\""));
            }
        }
    }

    #[test]
    fn text_is_escaped_and_the_language_is_set() {
        let h = access(vec![item(State::Pending)]).html(Lang::Ja);
        assert!(h.starts_with("<!doctype html><html lang=\"ja\">"));
        assert!(h.contains("VIP &lt;Pass&gt;") && h.contains("Acme &amp; Co"));
        assert!(h.contains("Una &lt;U&gt;") && !h.contains("<U>"));
        assert!(h.contains("value=\"tok.en&quot;\""));
        assert!(h.contains("Discord を連携する"));
        assert!(!h.contains("<script") && !h.contains("<img") && !h.contains("http"));
    }

    #[test]
    fn a_refused_authorization_asks_to_connect_again() {
        let mut p = access(vec![item(State::Delivered)]);
        if let Page::Access { reauthorize, .. } = &mut p {
            *reauthorize = true;
        }
        let h = p.html(Lang::En);
        assert!(
            h.contains("class=\"warning\"") && h.contains("Reconnect Discord"),
            "{h}"
        );
        let plain = access(vec![item(State::Delivered)]).html(Lang::En);
        assert!(!plain.contains("Reconnect Discord"));
    }

    #[test]
    fn states_follow_status_and_codes() {
        assert_eq!(State::of("Pending", None, None), State::Pending);
        assert_eq!(
            State::of("Failed", Some("discord_reauthorization_required"), None),
            State::NeedsAuthorization
        );
        assert_eq!(
            State::of("Failed", Some("discord_role_hierarchy"), None),
            State::MerchantTold
        );
        assert_eq!(
            State::of("Revoked", None, Some("refund")),
            State::Ended(Some("refund".into()))
        );
    }
}
