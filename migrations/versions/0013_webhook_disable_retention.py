"""Webhook endpoints a receiver disabled (disabled_at, disabled_reason), and message retention.

Standard Webhooks: a 410 Gone answer means the receiver no longer wants this source's messages, so
the sender disables the endpoint. Existing rows stay enabled (null). Messages past
STABLETRAIN_WEBHOOK_RETENTION_DAYS are deleted oldest first: an index on webhook_messages.created_at.

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
    op.create_index('ix_webhook_messages_created', 'webhook_messages', ['created_at'])


def downgrade():
    op.drop_index('ix_webhook_messages_created', table_name='webhook_messages')
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.drop_column('disabled_reason')
        batch_op.drop_column('disabled_at')
