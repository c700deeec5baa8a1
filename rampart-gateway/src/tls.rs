//! TLS with rustls (on ring): an acceptor for an HTTPS listener whose certificate is re-read on
//! reload, and the client side of `https://` upstream endpoints.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use tokio::net::TcpStream;

/// Why a certificate, key or CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the certificate and key (e.g. a key that does not match).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |message: String| TlsError::Pem { path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in the file".into()));
    }
    Ok(certs)
}

/// A rustls server configuration from PEM files, with ALPN `h2` and `http/1.1` (so gRPC works
/// over TLS).
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Pem { path: key.to_owned(), message: e.to_string() })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts TLS connections for an HTTPS listener, with the certificate and key read from PEM
/// files; [`reload`](Self::reload) re-reads them (connections after it get the new
/// certificate; a bad file keeps the old one).
///
/// ```no_run
/// use rampart_gateway::tls::TlsAcceptor;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = TlsAcceptor::from_pem_files("certs/server.pem", "certs/server.key")?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
/// let (tcp, _peer) = listener.accept().await?;
/// let stream = tls.accept(tcp).await?; // serve it with hyper-util's auto builder
/// let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
/// # let _ = http2;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TlsAcceptor {
    config: ArcSwap<ServerConfig>,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsAcceptor {
    /// Reads the certificate chain and the private key.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self, TlsError> {
        let (cert, key) = (cert.as_ref().to_owned(), key.as_ref().to_owned());
        let config = server_config(&cert, &key)?;
        Ok(Self { config: ArcSwap::from_pointee(config), cert, key })
    }

    /// Re-reads both files; on an error the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.config.store(Arc::new(server_config(&self.cert, &self.key)?));
        Ok(())
    }

    /// The TLS handshake on an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        tokio_rustls::TlsAcceptor::from(self.config.load_full()).accept(stream).await
    }
}

/// The client configuration of `https://` endpoints: the system's roots, or only the CA
/// certificates of the PEM file `ca` when given.
///
/// ```no_run
/// let config = rampart_gateway::tls::client_config(Some("certs/ca.pem".as_ref()))?;
/// # let _ = config;
/// # Ok::<(), rampart_gateway::tls::TlsError>(())
/// ```
pub fn client_config(ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert)?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "could not load a system root certificate");
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
