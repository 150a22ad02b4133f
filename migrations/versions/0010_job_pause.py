"""Pause and resume: jobs.paused_at and jobs.paused_s (statuses `pausing` and `paused` fit String(16)).

`paused_s` counts the seconds a started job spent paused, so the job time limit and the ETA count
running time only; existing rows start at 0.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-03 13:10:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('paused_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('paused_s', sa.Float(), server_default='0', nullable=False))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('paused_s')
        batch_op.drop_column('paused_at')
