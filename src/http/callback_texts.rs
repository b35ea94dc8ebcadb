//! What the OAuth callback's pages say, in every [`Lang`]. `{account}` and `{guild}`
//! are filled in, escaped, by the page (the `<b>` around them is the page's markup).

use crate::i18n::Lang;

pub struct Texts {
    pub connected_title: &'static str,
    pub connected: &'static str,
    pub switched: &'static str,
    pub shared: &'static str,
    pub open_server: &'static str,
    pub denied_title: &'static str,
    pub denied: &'static str,
    pub try_again: &'static str,
    pub expired_title: &'static str,
    pub expired: &'static str,
    pub tampered_title: &'static str,
    pub tampered: &'static str,
    pub used_title: &'static str,
    pub used: &'static str,
    pub revoked_title: &'static str,
    pub revoked: &'static str,
    pub discord_title: &'static str,
    pub discord: &'static str,
    pub unavailable_title: &'static str,
    pub unavailable: &'static str,
    pub too_many_title: &'static str,
    pub too_many: &'static str,
    pub busy_title: &'static str,
    pub busy: &'static str,
}

const EN: Texts = Texts {
    connected_title: "You're in",
    connected: "Your Discord account <b>{account}</b> is connected. You'll get access to <b>{guild}</b> in a moment.",
    switched: "Your access moves to this account from the Discord account you connected before, which loses what it was given for this purchase.",
    shared: "This Discord account is also connected to another purchase from this store: both purchases count towards it.",
    open_server: "Open the server in Discord",
    denied_title: "Authorization cancelled",
    denied: "You cancelled on Discord, so we could not give you access. You can try again whenever you like.",
    try_again: "Try again",
    expired_title: "This link has expired",
    expired: "Links to claim access are valid for a limited time. Get a fresh one where you found this one (your purchase page or the seller's customer portal).",
    tampered_title: "This link is not valid",
    tampered: "The link is incomplete or was altered. Open it again from your purchase page or the seller's customer portal.",
    used_title: "This link was already used",
    used: "Each link works once. If you need to connect a different Discord account, use the current link from your purchase page or the seller's customer portal.",
    revoked_title: "This access has ended",
    revoked: "The purchase this link belongs to no longer includes access to the Discord server (for example, the subscription ended or was refunded).",
    discord_title: "Discord didn't confirm your account",
    discord: "Discord did not accept the authorization. Please open the link again and authorize once more.",
    unavailable_title: "Something went wrong on our side",
    unavailable: "We could not finish connecting your account. Please try again in a few minutes.",
    too_many_title: "Too many attempts",
    too_many: "This link was tried too many times in a short while. Wait a few minutes, then open it again from your purchase page or the seller's customer portal.",
    busy_title: "Discord is busy right now",
    busy: "Many people are connecting their accounts at the moment, so yours was not connected yet. Wait a few seconds, then open your link again.",
};

const DE: Texts = Texts {
    connected_title: "Du bist dabei",
    connected: "Dein Discord-Konto <b>{account}</b> ist verbunden. Gleich bekommst du Zugang zu <b>{guild}</b>.",
    switched: "Dein Zugang wechselt zu diesem Konto von dem Discord-Konto, das du vorher verbunden hattest; jenes verliert, was es für diesen Kauf bekommen hat.",
    shared: "Dieses Discord-Konto ist auch mit einem anderen Kauf in diesem Shop verbunden: Beide Käufe zählen dafür.",
    open_server: "Server in Discord öffnen",
    denied_title: "Autorisierung abgebrochen",
    denied: "Du hast auf Discord abgebrochen, daher konnten wir dir keinen Zugang geben. Du kannst es jederzeit erneut versuchen.",
    try_again: "Erneut versuchen",
    expired_title: "Dieser Link ist abgelaufen",
    expired: "Links für den Zugang gelten nur eine begrenzte Zeit. Hol dir einen neuen dort, wo du diesen gefunden hast (deine Kaufseite oder das Kundenportal des Verkäufers).",
    tampered_title: "Dieser Link ist ungültig",
    tampered: "Der Link ist unvollständig oder wurde verändert. Öffne ihn erneut über deine Kaufseite oder das Kundenportal des Verkäufers.",
    used_title: "Dieser Link wurde schon verwendet",
    used: "Jeder Link funktioniert einmal. Wenn du ein anderes Discord-Konto verbinden möchtest, nutze den aktuellen Link von deiner Kaufseite oder aus dem Kundenportal des Verkäufers.",
    revoked_title: "Dieser Zugang ist beendet",
    revoked: "Der Kauf, zu dem dieser Link gehört, enthält keinen Zugang zum Discord-Server mehr (zum Beispiel, weil das Abo endete oder erstattet wurde).",
    discord_title: "Discord hat dein Konto nicht bestätigt",
    discord: "Discord hat die Autorisierung nicht angenommen. Bitte öffne den Link erneut und stimme noch einmal zu.",
    unavailable_title: "Bei uns ist etwas schiefgelaufen",
    unavailable: "Wir konnten dein Konto nicht fertig verbinden. Bitte versuche es in ein paar Minuten erneut.",
    too_many_title: "Zu viele Versuche",
    too_many: "Dieser Link wurde in kurzer Zeit zu oft versucht. Warte ein paar Minuten und öffne ihn dann erneut über deine Kaufseite oder das Kundenportal des Verkäufers.",
    busy_title: "Discord ist gerade ausgelastet",
    busy: "Gerade verbinden sehr viele Leute ihre Konten, daher wurde deins noch nicht verbunden. Warte ein paar Sekunden und öffne deinen Link dann erneut.",
};

const FR: Texts = Texts {
    connected_title: "C’est fait",
    connected: "Votre compte Discord <b>{account}</b> est connecté. Vous aurez accès à <b>{guild}</b> dans un instant.",
    switched: "Votre accès passe sur ce compte depuis le compte Discord connecté auparavant, qui perd ce qu’il avait reçu pour cet achat.",
    shared: "Ce compte Discord est aussi connecté à un autre achat dans cette boutique : les deux achats comptent pour lui.",
    open_server: "Ouvrir le serveur dans Discord",
    denied_title: "Autorisation annulée",
    denied: "Vous avez annulé sur Discord, nous n’avons donc pas pu vous donner accès. Vous pouvez réessayer quand vous voulez.",
    try_again: "Réessayer",
    expired_title: "Ce lien a expiré",
    expired: "Les liens d’accès sont valables un temps limité. Obtenez-en un nouveau là où vous avez trouvé celui-ci (votre page d’achat ou l’espace client du vendeur).",
    tampered_title: "Ce lien n’est pas valide",
    tampered: "Le lien est incomplet ou a été modifié. Ouvrez-le à nouveau depuis votre page d’achat ou l’espace client du vendeur.",
    used_title: "Ce lien a déjà été utilisé",
    used: "Chaque lien ne fonctionne qu’une fois. Pour connecter un autre compte Discord, utilisez le lien actuel de votre page d’achat ou de l’espace client du vendeur.",
    revoked_title: "Cet accès a pris fin",
    revoked: "L’achat auquel appartient ce lien ne donne plus accès au serveur Discord (par exemple, l’abonnement a pris fin ou a été remboursé).",
    discord_title: "Discord n’a pas confirmé votre compte",
    discord: "Discord n’a pas accepté l’autorisation. Ouvrez à nouveau le lien et autorisez une nouvelle fois.",
    unavailable_title: "Un problème est survenu de notre côté",
    unavailable: "Nous n’avons pas pu terminer la connexion de votre compte. Veuillez réessayer dans quelques minutes.",
    too_many_title: "Trop de tentatives",
    too_many: "Ce lien a été essayé trop de fois en peu de temps. Patientez quelques minutes, puis ouvrez-le à nouveau depuis votre page d’achat ou l’espace client du vendeur.",
    busy_title: "Discord est très sollicité",
    busy: "Beaucoup de personnes connectent leur compte en ce moment, le vôtre n’a donc pas encore été connecté. Patientez quelques secondes, puis ouvrez à nouveau votre lien.",
};

const ES: Texts = Texts {
    connected_title: "Ya estás dentro",
    connected: "Tu cuenta de Discord <b>{account}</b> está conectada. En un momento tendrás acceso a <b>{guild}</b>.",
    switched: "Tu acceso pasa a esta cuenta desde la cuenta de Discord que conectaste antes, que pierde lo que recibió por esta compra.",
    shared: "Esta cuenta de Discord también está conectada a otra compra de esta tienda: ambas compras cuentan para ella.",
    open_server: "Abrir el servidor en Discord",
    denied_title: "Autorización cancelada",
    denied: "Cancelaste en Discord, así que no pudimos darte acceso. Puedes volver a intentarlo cuando quieras.",
    try_again: "Intentar de nuevo",
    expired_title: "Este enlace ha caducado",
    expired: "Los enlaces de acceso son válidos durante un tiempo limitado. Consigue uno nuevo donde encontraste este (tu página de compra o el portal de clientes del vendedor).",
    tampered_title: "Este enlace no es válido",
    tampered: "El enlace está incompleto o fue modificado. Ábrelo de nuevo desde tu página de compra o el portal de clientes del vendedor.",
    used_title: "Este enlace ya se usó",
    used: "Cada enlace funciona una sola vez. Si necesitas conectar otra cuenta de Discord, usa el enlace actual de tu página de compra o del portal de clientes del vendedor.",
    revoked_title: "Este acceso ha terminado",
    revoked: "La compra a la que pertenece este enlace ya no incluye acceso al servidor de Discord (por ejemplo, la suscripción terminó o se reembolsó).",
    discord_title: "Discord no confirmó tu cuenta",
    discord: "Discord no aceptó la autorización. Abre el enlace de nuevo y vuelve a autorizar.",
    unavailable_title: "Algo salió mal por nuestra parte",
    unavailable: "No pudimos terminar de conectar tu cuenta. Vuelve a intentarlo en unos minutos.",
    too_many_title: "Demasiados intentos",
    too_many: "Este enlace se intentó demasiadas veces en poco tiempo. Espera unos minutos y ábrelo de nuevo desde tu página de compra o el portal de clientes del vendedor.",
    busy_title: "Discord está muy ocupado ahora",
    busy: "Mucha gente está conectando sus cuentas en este momento, así que la tuya aún no se conectó. Espera unos segundos y abre tu enlace de nuevo.",
};

const PT_BR: Texts = Texts {
    connected_title: "Tudo certo",
    connected: "Sua conta do Discord <b>{account}</b> está conectada. Em instantes você terá acesso a <b>{guild}</b>.",
    switched: "Seu acesso passa para esta conta a partir da conta do Discord que você conectou antes, que perde o que recebeu por esta compra.",
    shared: "Esta conta do Discord também está conectada a outra compra desta loja: as duas compras contam para ela.",
    open_server: "Abrir o servidor no Discord",
    denied_title: "Autorização cancelada",
    denied: "Você cancelou no Discord, então não pudemos dar acesso. Você pode tentar de novo quando quiser.",
    try_again: "Tentar de novo",
    expired_title: "Este link expirou",
    expired: "Os links de acesso valem por tempo limitado. Pegue um novo onde você encontrou este (sua página de compra ou o portal do cliente do vendedor).",
    tampered_title: "Este link não é válido",
    tampered: "O link está incompleto ou foi alterado. Abra-o de novo pela sua página de compra ou pelo portal do cliente do vendedor.",
    used_title: "Este link já foi usado",
    used: "Cada link funciona uma vez. Se precisar conectar outra conta do Discord, use o link atual da sua página de compra ou do portal do cliente do vendedor.",
    revoked_title: "Este acesso terminou",
    revoked: "A compra a que este link pertence não inclui mais acesso ao servidor do Discord (por exemplo, a assinatura terminou ou foi reembolsada).",
    discord_title: "O Discord não confirmou sua conta",
    discord: "O Discord não aceitou a autorização. Abra o link de novo e autorize mais uma vez.",
    unavailable_title: "Algo deu errado do nosso lado",
    unavailable: "Não conseguimos terminar de conectar sua conta. Tente de novo em alguns minutos.",
    too_many_title: "Tentativas demais",
    too_many: "Este link foi tentado vezes demais em pouco tempo. Aguarde alguns minutos e abra-o de novo pela sua página de compra ou pelo portal do cliente do vendedor.",
    busy_title: "O Discord está ocupado agora",
    busy: "Muitas pessoas estão conectando suas contas neste momento, então a sua ainda não foi conectada. Aguarde alguns segundos e abra seu link de novo.",
};

const JA: Texts = Texts {
    connected_title: "連携が完了しました",
    connected: "Discord アカウント <b>{account}</b> を連携しました。まもなく <b>{guild}</b> にアクセスできるようになります。",
    switched: "アクセスは以前に連携した Discord アカウントからこのアカウントに移ります。以前のアカウントは、このご購入で付与されたものを失います。",
    shared: "この Discord アカウントは、このストアでの別のご購入にも連携されています。どちらのご購入もこのアカウントに適用されます。",
    open_server: "Discord でサーバーを開く",
    denied_title: "承認がキャンセルされました",
    denied: "Discord でキャンセルされたため、アクセスを付与できませんでした。いつでももう一度お試しいただけます。",
    try_again: "もう一度試す",
    expired_title: "このリンクの有効期限が切れています",
    expired: "アクセス用のリンクは一定期間のみ有効です。このリンクを見つけた場所（購入ページや販売者のカスタマーポータル）で新しいリンクを取得してください。",
    tampered_title: "このリンクは無効です",
    tampered: "リンクが不完全か、改変されています。購入ページや販売者のカスタマーポータルからもう一度開いてください。",
    used_title: "このリンクはすでに使用されています",
    used: "各リンクは一度だけ使えます。別の Discord アカウントを連携するには、購入ページや販売者のカスタマーポータルにある最新のリンクをお使いください。",
    revoked_title: "このアクセスは終了しました",
    revoked: "このリンクのご購入には、Discord サーバーへのアクセスが含まれなくなりました（サブスクリプションの終了や返金など）。",
    discord_title: "Discord がアカウントを確認できませんでした",
    discord: "Discord が承認を受け付けませんでした。リンクをもう一度開いて、再度承認してください。",
    unavailable_title: "こちらで問題が発生しました",
    unavailable: "アカウントの連携を完了できませんでした。数分後にもう一度お試しください。",
    too_many_title: "試行回数が多すぎます",
    too_many: "このリンクは短時間に何度も試されました。数分待ってから、購入ページや販売者のカスタマーポータルからもう一度開いてください。",
    busy_title: "Discord が混み合っています",
    busy: "現在多くの方がアカウントを連携しているため、まだ連携できていません。数秒待ってから、もう一度リンクを開いてください。",
};

/// The callback pages' strings of a language.
pub fn of(lang: Lang) -> &'static Texts {
    match lang {
        Lang::En => &EN,
        Lang::De => &DE,
        Lang::Fr => &FR,
        Lang::Es => &ES,
        Lang::PtBr => &PT_BR,
        Lang::Ja => &JA,
    }
}

#[cfg(test)]
impl Texts {
    /// Every string, in field order.
    pub fn all(&self) -> Vec<&'static str> {
        vec![
            self.connected_title,
            self.connected,
            self.switched,
            self.shared,
            self.open_server,
            self.denied_title,
            self.denied,
            self.try_again,
            self.expired_title,
            self.expired,
            self.tampered_title,
            self.tampered,
            self.used_title,
            self.used,
            self.revoked_title,
            self.revoked,
            self.discord_title,
            self.discord,
            self.unavailable_title,
            self.unavailable,
            self.too_many_title,
            self.too_many,
            self.busy_title,
            self.busy,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_translates_every_string_and_keeps_the_placeholders() {
        crate::i18n::assert_translated(|l| of(l).all(), &["{account}", "{guild}", "<b>"], &[]);
    }
}
