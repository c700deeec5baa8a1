//! TLS with certificates made at test time (rcgen): `https://` upstream endpoints trusting a
//! configured CA, an HTTPS listener with ALPN h2 and http/1.1 (gRPC over TLS), and a reloaded
//! certificate served to new connections.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use common::*;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use proto::{
    GetUserRequest, GetUserResponse,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use rampart_gateway::{Gateway, tls::TlsAcceptor};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

/// A CA and a server certificate for `localhost` and 127.0.0.1, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self { dir: tempfile::tempdir().unwrap(), issuer };
        std::fs::write(pki.ca(), pki.issuer.pem()).unwrap();
        pki.issue();
        pki
    }

    /// Writes a new server certificate and key over the old ones; returns the certificate.
    fn issue(&self) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.cert(), cert.pem()).unwrap();
        std::fs::write(self.key(), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    fn cert(&self) -> PathBuf {
        self.path("server.pem")
    }
    fn key(&self) -> PathBuf {
        self.path("server.key")
    }

    fn acceptor(&self) -> Arc<TlsAcceptor> {
        Arc::new(TlsAcceptor::from_pem_files(self.cert(), self.key()).unwrap())
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut config = rampart_gateway::tls::client_config(Some(&self.ca())).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// An HTTPS client trusting `ca`, speaking HTTP/1.1 or (`h2`) HTTP/2 only.
fn https_client(pki: &Pki, h2: bool) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<bytes::Bytes>> {
    let tls = rampart_gateway::tls::client_config(Some(&pki.ca())).unwrap();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let connector = if h2 { builder.enable_http2().build() } else { builder.enable_http1().build() };
    let mut client = Client::builder(TokioExecutor::new());
    client.http2_only(h2);
    client.build(connector)
}

/// Which certificate a new TLS connection to `addr` is shown.
async fn served_certificate(pki: &Pki, addr: SocketAddr) -> CertificateDer<'static> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config(&[b"http/1.1"]));
    let stream = tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn gateway_config(endpoint: &str, ca: Option<&Path>, protocol: &str) -> String {
    let tls = ca.map(|ca| format!("tls = {{ ca = {:?} }}", ca.display())).unwrap_or_default();
    format!(
        r#"
        [[upstreams]]
        name = "u"
        endpoints = ["{endpoint}"]
        protocol = "{protocol}"
        {tls}
        [[routes]]
        name = "r"
        path_prefix = "/"
        upstream = "u"
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_trust_the_configured_ca_only() {
    let pki = Pki::new();
    let upstream = TestServer::start_tls(echo_app("tls", Hits::default()), pki.acceptor()).await;
    let endpoint = format!("https://localhost:{}", upstream.addr.port());
    let (gw, _) = gateway(&gateway_config(&endpoint, Some(&pki.ca()), "http1")).await;
    let response = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["upstream"], "tls");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http", "the client spoke plain HTTP to the gateway");

    // The same endpoint with the system's roots: the test CA is unknown, the handshake fails.
    let (gw, _) = gateway(&gateway_config(&endpoint, None, "http1")).await;
    let response = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(problem_code(response).await, "bad_gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_speaks_http1_and_h2_and_serves_a_reloaded_certificate() {
    let pki = Pki::new();
    let (upstream, _) = echo("u").await;
    let gateway = Gateway::builder().build(&config(&gateway_config(&upstream.url(""), None, "http1"))).unwrap();
    let tls = pki.acceptor();
    let gw = TestServer::start_tls(gateway.into_router(), tls.clone()).await;
    let url: http::Uri = format!("https://localhost:{}/x", gw.addr.port()).parse().unwrap();

    for h2 in [false, true] {
        let response = https_client(&pki, h2).get(url.clone()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 });
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let echo: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    }

    let first = served_certificate(&pki, gw.addr).await;
    let second = pki.issue();
    assert_ne!(first, second);
    assert_eq!(served_certificate(&pki, gw.addr).await, first, "files changed, not reloaded yet");
    tls.reload().unwrap();
    assert_eq!(served_certificate(&pki, gw.addr).await, second, "new connections get the reloaded certificate");

    // A broken file on reload keeps the certificate in use.
    std::fs::write(pki.key(), "not a key").unwrap();
    assert!(tls.reload().is_err());
    assert_eq!(served_certificate(&pki, gw.addr).await, second);
}

#[derive(Clone, Default)]
struct Users;

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(
        &self,
        request: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<GetUserResponse>, tonic::Status> {
        let id = request.into_inner().user_id;
        Ok(tonic::Response::new(GetUserResponse { user_id: id, username: format!("user{id}"), email: String::new() }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_to_an_h2c_upstream() {
    let pki = Pki::new();
    let upstream =
        TestServer::start(tonic::service::Routes::new(UserServiceServer::new(Users)).into_axum_router()).await;
    let gateway = Gateway::builder().build(&config(&gateway_config(&upstream.url(""), None, "h2c"))).unwrap();
    let gw = TestServer::start_tls(gateway.into_router(), pki.acceptor()).await;

    // tonic with a rustls connector of our own (ALPN h2), so tonic needs no TLS feature.
    let (addr, tls) = (gw.addr, pki.client_config(&[b"h2"]));
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(ServerName::try_from("localhost")?, tcp).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(TokioIo::new(stream))
        }
    });
    let channel =
        tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector(connector).await.unwrap();
    let mut client = UserServiceClient::new(channel);
    let user = client.get_user(GetUserRequest { user_id: 9 }).await.unwrap().into_inner();
    assert_eq!(user.username, "user9");
}
