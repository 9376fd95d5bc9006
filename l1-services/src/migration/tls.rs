//! TLS 1.3 with mutual certificate authentication (rustls, `ring` provider). Both ends hold a
//! directory with `ca.pem` (the CA that signs every node of the cluster), `node.pem` and
//! `node.key` (this node's certificate chain and key). The destination requires a client
//! certificate signed by the CA; the source checks the destination's certificate against the
//! CA under the name [`SERVER_NAME`] (not the address, so nodes can move). rustls has no
//! external pre-shared-key support, so certificates are the only way in.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name every node certificate carries and every source checks.
pub const SERVER_NAME: &str = "spanvmm-migration";

/// The TLS 1.3 cipher suite a migration uses. The source chooses (`ctl migrate --cipher`); a
/// destination accepts any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cipher {
    /// The default: TLS 1.3's cheapest strong suite on AES-NI hosts (page data is bulk;
    /// 128-bit keys are ample), a third fewer AES rounds than AES-256.
    #[default]
    Aes128Gcm,
    /// 256-bit keys, for policies that require them.
    Aes256Gcm,
    /// For hosts without AES instructions, where it is the fastest of the three.
    Chacha20Poly1305,
}

impl Cipher {
    /// Every suite, in the destination's order of preference (the source's choice wins).
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    /// The name `--cipher` takes and reports carry.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes-128-gcm",
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::Chacha20Poly1305 => "chacha20-poly1305",
        }
    }

    fn suite(self) -> rustls::SupportedCipherSuite {
        use rustls::crypto::ring::cipher_suite as cs;
        match self {
            Cipher::Aes128Gcm => cs::TLS13_AES_128_GCM_SHA256,
            Cipher::Aes256Gcm => cs::TLS13_AES_256_GCM_SHA384,
            Cipher::Chacha20Poly1305 => cs::TLS13_CHACHA20_POLY1305_SHA256,
        }
    }

    /// The suite a handshake settled on.
    pub fn of(suite: rustls::SupportedCipherSuite) -> Option<Cipher> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.suite().suite() == suite.suite())
    }
}

impl std::str::FromStr for Cipher {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Cipher::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!("unknown cipher {s:?}: aes-128-gcm, aes-256-gcm or chacha20-poly1305")
            })
    }
}

/// ring, with the TLS 1.3 suites of `ciphers` only.
fn provider(ciphers: &[Cipher]) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = ciphers.iter().map(|c| c.suite()).collect();
    Arc::new(p)
}

/// Why TLS material could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or malformed.
    #[error("{path}: {err}")]
    Pem {
        /// The file.
        path: String,
        /// Cause.
        err: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{0}: no certificate in it")]
    NoCertificate(String),
    /// The CA certificate is refused.
    #[error("{path}: {err}")]
    Root {
        /// The file.
        path: String,
        /// Cause.
        err: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the protocol versions.
    #[error("{0}")]
    Protocol(rustls::Error),
    /// The node's certificate chain or key is refused.
    #[error("node certificate: {0}")]
    Node(rustls::Error),
    /// Certificate generation failed.
    #[error("{0}")]
    Generate(#[from] rcgen::Error),
    /// Writing generated material failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> TlsError + '_ {
    move |err| TlsError::Io {
        path: path.display().to_string(),
        err,
    }
}

struct Material {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(dir: &Path) -> Result<Material, TlsError> {
    let file = |n: &str| dir.join(n).display().to_string();
    let pem = |n: &str| {
        let path = file(n);
        move |err| TlsError::Pem { path, err }
    };
    let certs = |n: &str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let v = CertificateDer::pem_file_iter(dir.join(n))
            .map_err(pem(n))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem(n))?;
        if v.is_empty() {
            return Err(TlsError::NoCertificate(file(n)));
        }
        Ok(v)
    };
    let mut roots = RootCertStore::empty();
    for c in certs("ca.pem")? {
        roots.add(c).map_err(|err| TlsError::Root {
            path: file("ca.pem"),
            err,
        })?;
    }
    let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).map_err(pem("node.key"))?;
    Ok(Material {
        roots,
        chain: certs("node.pem")?,
        key,
    })
}

/// The destination's configuration: TLS 1.3 only, client certificates required.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let m = load(dir)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots), provider(&Cipher::ALL))
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider(&Cipher::ALL))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain, m.key)
        .map_err(TlsError::Node)?;
    // The link protects its records itself after `hello` (`records.rs`): rustls hands it the
    // keys. No session tickets: nothing resumes, and no handshake record follows the hello.
    cfg.enable_secret_extraction = true;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The source's configuration: TLS 1.3 only with `cipher`, the destination checked against
/// the CA, our certificate presented.
pub fn client_config(dir: &Path, cipher: Cipher) -> Result<Arc<ClientConfig>, TlsError> {
    let m = load(dir)?;
    let mut cfg = ClientConfig::builder_with_provider(provider(&[cipher]))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_root_certificates(m.roots)
        .with_client_auth_cert(m.chain, m.key)
        .map_err(TlsError::Node)?;
    // See `server_config`: the link takes the keys over after `hello`.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The name the source expects the destination's certificate to carry.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// Writes a new CA (`ca.pem`, `ca.key`) and one node certificate signed by it (`node.pem`,
/// `node.key`, usable as server and client) into `out`. Copy the directory without `ca.key`
/// to every node.
pub fn generate(out: &Path) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(out).map_err(io_at(out))?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "spanvmm migration CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut node = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    node.distinguished_name
        .push(DnType::CommonName, "spanvmm node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node_key = KeyPair::generate()?;
    let node_cert = node.signed_by(&node_key, &ca_cert, &ca_key)?;
    let write = |name: &str, text: String, private: bool| -> Result<(), TlsError> {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io_at(&p))?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(io_at(&p))?;
        }
        Ok(())
    };
    write("ca.pem", ca_cert.pem(), false)?;
    write("ca.key", ca_key.serialize_pem(), true)?;
    write("node.pem", node_cert.pem(), false)?;
    write("node.key", node_key.serialize_pem(), true)?;
    Ok(())
}
