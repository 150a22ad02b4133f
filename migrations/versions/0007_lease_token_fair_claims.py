"""jobs.lease_token (every worker write is fenced by it) and jobs.claimed_at (fair claims across keys).

Revision ID: 0007
Revises: 0003
Create Date: 2026-12-03 08:00:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_token', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_jobs_owner_claimed', ['owner_id', 'claimed_at'], unique=False)


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_owner_claimed')
        batch_op.drop_column('claimed_at')
        batch_op.drop_column('lease_token')
