"""Webhook endpoints a receiver disabled: webhook_endpoints.disabled_at and disabled_reason.

Standard Webhooks: a 410 Gone answer means the receiver no longer wants this source's messages, so
the sender disables the endpoint. Existing rows stay enabled (null).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 19:20:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('disabled_reason', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.drop_column('disabled_reason')
        batch_op.drop_column('disabled_at')
