//! The languages of what customers read (emails, the access page): English, German,
//! French, Spanish, Brazilian Portuguese and Japanese. A business picks the language of
//! its emails (`/business/settings`); a page follows the reader's `Accept-Language`.

/// A language customers can read guildgate in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Lang {
    #[default]
    En,
    De,
    Fr,
    Es,
    PtBr,
    Ja,
}

impl Lang {
    pub const ALL: [Lang; 6] = [Lang::En, Lang::De, Lang::Fr, Lang::Es, Lang::PtBr, Lang::Ja];

    /// The BCP 47 tag, as `lang` and `Content-Language` carry it.
    pub fn tag(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::De => "de",
            Lang::Fr => "fr",
            Lang::Es => "es",
            Lang::PtBr => "pt-BR",
            Lang::Ja => "ja",
        }
    }

    /// Exactly one of the tags above (any case).
    pub fn parse(tag: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.tag().eq_ignore_ascii_case(tag.trim()))
    }

    /// The language a tag asks for, by its primary subtag: `de-AT` is German, any `pt`
    /// Brazilian Portuguese.
    fn of_range(range: &str) -> Option<Self> {
        let primary = range.split('-').next()?.trim();
        match primary.to_ascii_lowercase().as_str() {
            "en" => Some(Lang::En),
            "de" => Some(Lang::De),
            "fr" => Some(Lang::Fr),
            "es" => Some(Lang::Es),
            "pt" => Some(Lang::PtBr),
            "ja" => Some(Lang::Ja),
            _ => None,
        }
    }

    /// The best language for an `Accept-Language` header (RFC 9110 §12.5.4: the
    /// highest `q` wins, the earlier of equal ones; `q=0` means "not this"), or `None`
    /// when it names none of them.
    pub fn negotiate(accept_language: &str) -> Option<Self> {
        let mut best: Option<(u16, Lang)> = None;
        for item in accept_language.split(',').take(32) {
            let mut parts = item.split(';');
            let range = parts.next().unwrap_or("").trim();
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map(|q| (q.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0) * 1000.0) as u16)
                .unwrap_or(1000);
            let Some(lang) = Self::of_range(range) else {
                continue;
            };
            if q > 0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, lang));
            }
        }
        best.map(|(_, l)| l)
    }
}

/// Declares a table of what customers read: a struct of one `&'static str` per field,
/// `all()` (every string in field order, for [`assert_translated`]) and `of(lang)`, the
/// table of a language: the calling module's constants `EN`, `DE`, `FR`, `ES`, `PT_BR`
/// and `JA`, one per [`Lang`] (a language added here fails to build until each table
/// has its constant).
macro_rules! texts {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: &'static str, )*
        }

        #[cfg(test)]
        impl $name {
            /// Every string, in field order.
            pub fn all(&self) -> Vec<&'static str> {
                vec![$(self.$field),*]
            }
        }

        /// The strings of a language: the module's `EN`, `DE`, `FR`, `ES`, `PT_BR` and
        /// `JA` tables.
        pub fn of(lang: $crate::i18n::Lang) -> &'static $name {
            use $crate::i18n::Lang;
            match lang {
                Lang::En => &EN,
                Lang::De => &DE,
                Lang::Fr => &FR,
                Lang::Es => &ES,
                Lang::PtBr => &PT_BR,
                Lang::Ja => &JA,
            }
        }
    };
}
pub(crate) use texts;

/// Text made safe to put in HTML, in an element or a quoted attribute.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Checks a table of strings (`of(lang)` gives every string of a language, in the same
/// order for all): every language has each string translated, not copied from English
/// (except the pairs in `same_ok`, words two languages share), with the same
/// placeholders.
#[cfg(test)]
pub(crate) fn assert_translated(
    of: impl Fn(Lang) -> Vec<&'static str>,
    placeholders: &[&str],
    same_ok: &[(Lang, &str)],
) {
    let en = of(Lang::En);
    for lang in Lang::ALL.into_iter().filter(|l| *l != Lang::En) {
        let other = of(lang);
        assert_eq!(other.len(), en.len(), "{lang:?}");
        for (i, s) in other.into_iter().enumerate() {
            if !same_ok.contains(&(lang, en[i])) {
                assert_ne!(s, en[i], "{lang:?} copies the English {:?}", en[i]);
            }
            for p in placeholders {
                assert_eq!(s.contains(p), en[i].contains(p), "{lang:?} {s:?}: {p}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_language_picks_the_most_wanted_known_language() {
        assert_eq!(Lang::negotiate("de-DE,de;q=0.9,en;q=0.8"), Some(Lang::De));
        assert_eq!(Lang::negotiate("it, fr;q=0.5, ja;q=0.7"), Some(Lang::Ja));
        assert_eq!(Lang::negotiate("pt-PT"), Some(Lang::PtBr));
        assert_eq!(Lang::negotiate("en;q=0, es"), Some(Lang::Es));
        assert_eq!(Lang::negotiate("fr;q=0.5, de;q=0.5"), Some(Lang::Fr));
        assert_eq!(Lang::negotiate("it, nl"), None);
        assert_eq!(Lang::negotiate(""), None);
        assert_eq!(Lang::negotiate("*"), None);
        assert_eq!(Lang::negotiate("ja;q=banana"), None);
    }

    #[test]
    fn tags_round_trip() {
        for l in Lang::ALL {
            assert_eq!(Lang::parse(l.tag()), Some(l));
        }
        assert_eq!(Lang::parse("PT-br"), Some(Lang::PtBr));
        assert_eq!(Lang::parse("pt"), None);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
