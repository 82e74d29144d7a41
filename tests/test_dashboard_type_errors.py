"""A job type whose claims fail is shown on the dashboard with its error, while the other types look as usual."""

from conftest import make_type

from jobrunner import dashboard, services, store


def test_a_type_whose_claims_fail_shows_its_error_and_the_others_do_not(conn):
    make_type(conn, "email")
    make_type(conn, "sms")
    store.record_type_error(conn, "email", "claim", "timestamp too large <year 10000>")
    store.record_type_error(conn, "email", "claim", "timestamp too large <year 10000>")

    overview = services.overview(conn)
    page = dashboard.render(overview, "jobrunner").decode()

    assert set(overview.type_errors) == {"email"} and overview.type_errors["email"].failures == 2
    email_row = page.split('<tr data-type="email">')[1].split("</tr>")[0]
    sms_row = page.split('<tr data-type="sms">')[1].split("</tr>")[0]
    assert "claim failing" in email_row and "2 failed tries since" in email_row
    assert "timestamp too large &lt;year 10000&gt;" in email_row  # the message as text, never markup
    assert "failing" not in sms_row
