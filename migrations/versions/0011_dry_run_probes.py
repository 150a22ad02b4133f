"""probes (LR range tests of a job's spec) and device_calibrations (measured training throughput).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 13:20:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'probes',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('job_id', sa.String(length=40), nullable=False),
        sa.Column('owner_id', sa.String(length=40), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['owner_id'], ['api_keys.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('probes', schema=None) as batch_op:
        batch_op.create_index('ix_probes_job_id', ['job_id'], unique=False)
        batch_op.create_index('ix_probes_owner_status', ['owner_id', 'status'], unique=False)
    op.create_table(
        'device_calibrations',
        sa.Column('device_class', sa.String(length=200), nullable=False),
        sa.Column('flops_per_s', sa.Float(), nullable=False),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('device_class'),
    )


def downgrade():
    op.drop_table('device_calibrations')
    with op.batch_alter_table('probes', schema=None) as batch_op:
        batch_op.drop_index('ix_probes_owner_status')
        batch_op.drop_index('ix_probes_job_id')
    op.drop_table('probes')
