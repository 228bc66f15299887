//! The throwaway database: schema loaded, reachable by URL, removed on drop.

use supabase_emulator::pg::TestDatabase;
use tokio_postgres::NoTls;

#[tokio::test]
async fn test_database_has_schema_and_roles() {
    let database = TestDatabase::start().await.expect("database starts");
    let (client, connection) = tokio_postgres::connect(database.url(), NoTls)
        .await
        .expect("connects");
    tokio::spawn(connection);

    let row = client
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('anon','authenticated','service_role')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);

    let row = client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'supabase_realtime' AND tablename = 'jobs'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);

    client
        .execute("INSERT INTO jobs (action) VALUES ('echo')", &[])
        .await
        .expect("jobs table accepts a row");
}

#[tokio::test]
async fn test_database_removed_on_drop() {
    let database = TestDatabase::start().await.expect("database starts");
    let url = database.url().to_string();
    drop(database);
    let result = tokio_postgres::connect(&url, NoTls).await;
    assert!(
        result.is_err(),
        "database at {url} still accepts connections"
    );
}
