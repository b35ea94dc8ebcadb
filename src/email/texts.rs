//! What the emails say, in every [`Lang`](crate::i18n::Lang). `{product}` and `{server}` are filled in by
//! [`super::compose`] (escaped for the HTML part).

crate::i18n::texts! {
    /// The strings of the emails in one language.
    pub struct Texts {
        /// Subject of the first email of a grant that needs the customer's Discord account.
        pub join_subject,
        /// Subject of a reminder.
        pub reminder_subject,
        /// Subject of an email about access already delivered (a resend).
        pub access_subject,
        pub greeting,
        /// The first paragraph of a join email.
        pub join_intro,
        /// The first paragraph of a reminder.
        pub reminder_intro,
        /// The first paragraph of an email about delivered access.
        pub access_intro,
        /// The button that opens the grant's Discord authorization.
        pub join_button,
        /// The button that opens the access page.
        pub access_button,
        /// Before the access page link, in a join email or reminder.
        pub access_hint,
        /// When there is a support address (the email's `Reply-To`).
        pub reply_hint,
        /// The last line: why they got it.
        pub footer,
    }
}

const EN: Texts = Texts {
    join_subject: "Join {server} on Discord",
    reminder_subject: "Reminder: join {server} on Discord",
    access_subject: "Your access to {server} on Discord",
    greeting: "Hello,",
    join_intro: "Your purchase of {product} includes access to the Discord server {server}. Connect your Discord account to join it.",
    reminder_intro: "You have not joined {server} yet. Your purchase of {product} includes access to it: connect your Discord account to join.",
    access_intro: "Your purchase of {product} includes access to the Discord server {server}. Your access page shows its state and lets you fix it if something is wrong.",
    join_button: "Join the Discord",
    access_button: "Open your access page",
    access_hint: "To see your access, reconnect, or use another Discord account, open your access page:",
    reply_hint: "Questions? Reply to this email.",
    footer: "You receive this email because of your purchase of {product}.",
};

const DE: Texts = Texts {
    join_subject: "Tritt {server} auf Discord bei",
    reminder_subject: "Erinnerung: Tritt {server} auf Discord bei",
    access_subject: "Dein Zugang zu {server} auf Discord",
    greeting: "Hallo,",
    join_intro: "Dein Kauf von {product} enthält Zugang zum Discord-Server {server}. Verbinde dein Discord-Konto, um beizutreten.",
    reminder_intro: "Du bist {server} noch nicht beigetreten. Dein Kauf von {product} enthält den Zugang: Verbinde dein Discord-Konto, um beizutreten.",
    access_intro: "Dein Kauf von {product} enthält Zugang zum Discord-Server {server}. Auf deiner Zugangsseite siehst du den Stand und kannst Probleme selbst beheben.",
    join_button: "Discord beitreten",
    access_button: "Zugangsseite öffnen",
    access_hint: "Um deinen Zugang zu sehen, dich neu zu verbinden oder ein anderes Discord-Konto zu verwenden, öffne deine Zugangsseite:",
    reply_hint: "Fragen? Antworte einfach auf diese E-Mail.",
    footer: "Du erhältst diese E-Mail wegen deines Kaufs von {product}.",
};

const FR: Texts = Texts {
    join_subject: "Rejoignez {server} sur Discord",
    reminder_subject: "Rappel : rejoignez {server} sur Discord",
    access_subject: "Votre accès à {server} sur Discord",
    greeting: "Bonjour,",
    join_intro: "Votre achat de {product} comprend l’accès au serveur Discord {server}. Connectez votre compte Discord pour le rejoindre.",
    reminder_intro: "Vous n’avez pas encore rejoint {server}. Votre achat de {product} y donne accès : connectez votre compte Discord pour le rejoindre.",
    access_intro: "Votre achat de {product} comprend l’accès au serveur Discord {server}. Votre page d’accès indique où il en est et vous permet de régler un problème vous-même.",
    join_button: "Rejoindre le Discord",
    access_button: "Ouvrir votre page d’accès",
    access_hint: "Pour voir votre accès, vous reconnecter ou utiliser un autre compte Discord, ouvrez votre page d’accès :",
    reply_hint: "Une question ? Répondez simplement à cet e-mail.",
    footer: "Vous recevez cet e-mail suite à votre achat de {product}.",
};

const ES: Texts = Texts {
    join_subject: "Únete a {server} en Discord",
    reminder_subject: "Recordatorio: únete a {server} en Discord",
    access_subject: "Tu acceso a {server} en Discord",
    greeting: "Hola:",
    join_intro: "Tu compra de {product} incluye acceso al servidor de Discord {server}. Conecta tu cuenta de Discord para unirte.",
    reminder_intro: "Todavía no te has unido a {server}. Tu compra de {product} incluye el acceso: conecta tu cuenta de Discord para unirte.",
    access_intro: "Tu compra de {product} incluye acceso al servidor de Discord {server}. Tu página de acceso muestra su estado y te permite arreglar cualquier problema.",
    join_button: "Unirme al Discord",
    access_button: "Abrir tu página de acceso",
    access_hint: "Para ver tu acceso, volver a conectarte o usar otra cuenta de Discord, abre tu página de acceso:",
    reply_hint: "¿Tienes preguntas? Responde a este correo.",
    footer: "Recibes este correo por tu compra de {product}.",
};

const PT_BR: Texts = Texts {
    join_subject: "Entre em {server} no Discord",
    reminder_subject: "Lembrete: entre em {server} no Discord",
    access_subject: "Seu acesso a {server} no Discord",
    greeting: "Olá,",
    join_intro: "Sua compra de {product} inclui acesso ao servidor do Discord {server}. Conecte sua conta do Discord para entrar.",
    reminder_intro: "Você ainda não entrou em {server}. Sua compra de {product} inclui o acesso: conecte sua conta do Discord para entrar.",
    access_intro: "Sua compra de {product} inclui acesso ao servidor do Discord {server}. Sua página de acesso mostra a situação e permite que você resolva problemas por conta própria.",
    join_button: "Entrar no Discord",
    access_button: "Abrir sua página de acesso",
    access_hint: "Para ver seu acesso, conectar de novo ou usar outra conta do Discord, abra sua página de acesso:",
    reply_hint: "Dúvidas? É só responder a este e-mail.",
    footer: "Você está recebendo este e-mail por causa da sua compra de {product}.",
};

const JA: Texts = Texts {
    join_subject: "Discord の {server} に参加しましょう",
    reminder_subject: "リマインダー：Discord の {server} に参加してください",
    access_subject: "Discord の {server} へのアクセス",
    greeting: "こんにちは。",
    join_intro: "{product} のご購入には、Discord サーバー {server} へのアクセスが含まれています。Discord アカウントを連携して参加してください。",
    reminder_intro: "まだ {server} に参加していません。{product} のご購入にはこのサーバーへのアクセスが含まれています。Discord アカウントを連携して参加してください。",
    access_intro: "{product} のご購入には、Discord サーバー {server} へのアクセスが含まれています。アクセスページで状態を確認し、問題があればご自身で解決できます。",
    join_button: "Discord に参加する",
    access_button: "アクセスページを開く",
    access_hint: "アクセスの確認、再連携、別の Discord アカウントへの切り替えは、アクセスページから行えます：",
    reply_hint: "ご不明な点は、このメールに返信してください。",
    footer: "このメールは {product} のご購入に基づいてお送りしています。",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_translates_every_string_and_keeps_the_placeholders() {
        crate::i18n::assert_translated(|l| of(l).all(), &["{product}", "{server}"], &[]);
    }
}
